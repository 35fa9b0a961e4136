"""Collator: audio streams and labels (docs/design.md §4), expansion, padding and packing, validation."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from helpers import text_only, tts
from higgs_ds.data.batch import IGNORE, Batch
from higgs_ds.data.collator import Collator
from higgs_ds.data.sample import SampleError, TokenizedSample
from higgs_ds.data.tokens import AudioSettings

AUDIO = AudioSettings()


def test_delay_pattern_design_example(tokens):
    """docs/design.md §4: K=4, T=3, codes 10..21 (row-major)."""
    audio = AudioSettings(num_codebooks=4)
    ids = np.array([tokens.audio_out_bos, tokens.audio_out, tokens.audio_eos], dtype=np.int32)
    sample = TokenizedSample("ex", ids, ids.copy(), [np.arange(10, 22).reshape(4, 3)])
    batch = Collator(tokens, audio)([sample])
    b, e, i = 1024, 1025, IGNORE
    assert batch.audio_out_ids.tolist() == [[b, 10, 11, 12, e, e, e, e], [b, b, 13, 14, 15, e, e, e],
                                            [b, b, b, 16, 17, 18, e, e], [b, b, b, b, 19, 20, 21, e]]
    assert batch.audio_out_labels.tolist() == [[i, 10, 11, 12, e, i, i, i], [i, i, 13, 14, 15, e, i, i],
                                               [i, i, i, 16, 17, 18, e, i], [i, i, i, i, 19, 20, 21, e]]
    assert batch.input_ids[0].tolist() == [tokens.audio_out_bos] + [tokens.audio_out] * 8 + [tokens.audio_eos]
    assert batch.audio_in_ids.shape == (4, 0)


def test_stream_without_delay_pattern(tokens):
    ids = np.array([tokens.audio_out_bos, tokens.audio_out, tokens.audio_eos], dtype=np.int32)
    sample = TokenizedSample("ex", ids, ids.copy(), [np.arange(10, 16).reshape(2, 3)])
    batch = Collator(tokens, AudioSettings(num_codebooks=2, use_delay_pattern=False))([sample])
    assert batch.audio_out_ids.tolist() == [[1024, 10, 11, 12, 1025], [1024, 13, 14, 15, 1025]]
    assert batch.audio_out_labels.tolist() == [[IGNORE, 10, 11, 12, 1025], [IGNORE, 13, 14, 15, 1025]]
    assert batch.audio_out_mask.sum() == 5


@pytest.mark.parametrize("use_delay_pattern", [True, False])
def test_each_codebook_row_has_T_plus_1_labels_equal_to_inputs(tokenizer, tokens, use_delay_pattern):
    audio = AudioSettings(use_delay_pattern=use_delay_pattern)
    frames = (1, 7, 30)
    batch = Collator(tokens, audio)([tts(tokenizer, tokens, frames=frames, seed=3)])
    widths = [audio.frames(t) for t in frames[1:]]  # frames[0] is the audio-in segment
    assert batch.audio_out_labels.shape == (8, sum(widths))
    for labels, ids, t in zip(batch.audio_out_labels.split(widths, 1), batch.audio_out_ids.split(widths, 1),
                              frames[1:]):
        learnable = labels != IGNORE
        assert learnable.sum(1).tolist() == [t + 1] * 8
        assert torch.equal(labels[learnable], ids[learnable])  # unshifted: a label equals its input
        assert (labels == 1025).sum(1).tolist() == [1] * 8


def test_untrained_segment_labels_all_ignored(tokenizer, tokens):
    """start_index=3: the reference answer's <|AUDIO_OUT|> has text label -100, so its audio labels are all -100."""
    sample = tts(tokenizer, tokens, frames=(4, 6, 9), start_index=3)
    batch = Collator(tokens, AUDIO)([sample])
    ref, target = batch.audio_out_labels.split([AUDIO.frames(6), AUDIO.frames(9)], 1)
    assert (ref == IGNORE).all()
    assert (target != IGNORE).sum() == 8 * 10
    full = Collator(tokens, AUDIO)([tts(tokenizer, tokens, frames=(4, 6, 9))]).audio_out_labels
    assert (full[:, :AUDIO.frames(6)] != IGNORE).sum() == 8 * 7  # without start_index the reference is trained


@pytest.mark.parametrize("use_delay_pattern", [True, False])
def test_expansion_positions_and_text_labels(tokenizer, tokens, use_delay_pattern):
    audio = AudioSettings(use_delay_pattern=use_delay_pattern)
    sample = tts(tokenizer, tokens, frames=(2, 3, 4))
    batch = Collator(tokens, audio)([sample])
    frames = batch.audio_in_mask[0] | batch.audio_out_mask[0]
    assert (batch.label_ids[0][frames] == IGNORE).all()
    assert int(batch.audio_in_mask.sum()) == batch.audio_in_ids.shape[1] == audio.frames(2)
    assert int(batch.audio_out_mask.sum()) == batch.audio_out_ids.shape[1] == audio.frames(3) + audio.frames(4)
    assert (batch.input_ids[0][batch.audio_in_mask[0]] == tokens.audio_in).all()
    assert (batch.input_ids[0][batch.audio_out_mask[0]] == tokens.audio_out).all()
    # Collapsing each run of frames back to one placeholder gives the sample's tokens; labels lose only the
    # placeholders' own labels (upstream mask_audio_out_token_label).
    run_start = frames & ~torch.cat([torch.tensor([False]), frames[:-1]])
    keep = ~frames | run_start
    assert batch.input_ids[0][keep].tolist() == sample.input_ids.tolist()
    placeholder = sample.placeholder_positions(tokens)
    expected_labels = sample.label_ids.astype(np.int64)
    expected_labels[placeholder] = IGNORE
    assert batch.label_ids[0][keep].tolist() == expected_labels.tolist()
    assert batch.position_ids[0].tolist() == list(range(sample.num_expanded_tokens(audio)))


def test_collate_twice_identical_and_inputs_unmodified(golden_samples, tokens):
    samples = list(golden_samples.values())[:8]
    before = copy.deepcopy(samples)
    collate = Collator(tokens, AUDIO)
    first, second = collate(samples), collate(samples)
    for name, value in first.tensors().items():
        assert torch.equal(value, getattr(second, name)), name
    assert (first.audio_out_labels != IGNORE).any()
    for s, b in zip(samples, before):
        assert np.array_equal(s.input_ids, b.input_ids) and np.array_equal(s.label_ids, b.label_ids)
        assert all(np.array_equal(c, d) for c, d in zip(s.audio_codes, b.audio_codes))


def test_batch_dtypes_and_padded_layout(golden_samples, tokens):
    samples = [golden_samples[k] for k in ("tts_basic", "long_audio", "text_only")]
    batch = Collator(tokens, AUDIO, round_to=64)(samples)
    lengths = [s.num_expanded_tokens(AUDIO) for s in samples]
    assert batch.input_ids.shape == (3, -(-max(lengths) // 64) * 64)
    assert batch.sample_keys == ["tts_basic", "long_audio", "text_only"]
    for name, dtype in [("input_ids", torch.long), ("attention_mask", torch.bool), ("position_ids", torch.long),
                        ("segment_ids", torch.int32), ("label_ids", torch.long), ("audio_in_mask", torch.bool),
                        ("audio_out_mask", torch.bool), ("audio_in_ids", torch.long), ("audio_out_ids", torch.long),
                        ("audio_out_labels", torch.long)]:
        assert getattr(batch, name).dtype == dtype, name
    for row, n in enumerate(lengths):
        assert batch.attention_mask[row].tolist() == [True] * n + [False] * (batch.input_ids.shape[1] - n)
        pad = ~batch.attention_mask[row]
        assert (batch.input_ids[row][pad] == tokens.pad).all() and (batch.label_ids[row][pad] == IGNORE).all()
        assert not batch.segment_ids[row][pad].any() and not batch.position_ids[row][pad].any()
        assert (batch.segment_ids[row][~pad] == 1).all()
        assert not (batch.audio_in_mask[row][pad] | batch.audio_out_mask[row][pad]).any()


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_text_only_batch_has_zero_size_audio(tokenizer, tokens, layout):
    samples = [text_only(tokenizer, tokens, "a"), text_only(tokenizer, tokens, "b")]
    batch = Collator(tokens, AUDIO, layout=layout, pack_length=64 if layout == "packed" else None)(samples)
    for name in ("audio_in_ids", "audio_out_ids", "audio_out_labels"):
        assert getattr(batch, name).shape == (8, 0) and getattr(batch, name).dtype == torch.long
    assert not batch.audio_in_mask.any() and not batch.audio_out_mask.any()


def split_by_sample(batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
    """Per sample key: its span of every [B, L] tensor and its columns of the audio tensors."""
    in_col = (batch.audio_in_mask.flatten().cumsum(0) - 1).view_as(batch.audio_in_mask)
    out_col = (batch.audio_out_mask.flatten().cumsum(0) - 1).view_as(batch.audio_out_mask)
    keys = iter(batch.sample_keys)
    out = {}
    for row in range(batch.input_ids.shape[0]):
        for segment in range(1, int(batch.segment_ids[row].max()) + 1):
            span = batch.segment_ids[row] == segment
            in_mask, out_mask = batch.audio_in_mask[row][span], batch.audio_out_mask[row][span]
            out[next(keys)] = {
                **{n: getattr(batch, n)[row][span] for n in ("input_ids", "label_ids", "position_ids",
                                                             "audio_in_mask", "audio_out_mask")},
                "audio_in_ids": batch.audio_in_ids[:, in_col[row][span][in_mask]],
                "audio_out_ids": batch.audio_out_ids[:, out_col[row][span][out_mask]],
                "audio_out_labels": batch.audio_out_labels[:, out_col[row][span][out_mask]]}
    assert next(keys, None) is None
    return out


def test_packed_batch_carries_the_same_samples_as_padded(golden_samples, tokens):
    samples = list(golden_samples.values())
    padded = Collator(tokens, AUDIO)(samples)
    packed = Collator(tokens, AUDIO, layout="packed", pack_length=1024, round_to=8)(samples)
    assert packed.input_ids.shape[0] < len(samples) and packed.input_ids.shape[1] % 8 == 0
    assert sorted(packed.sample_keys) == sorted(padded.sample_keys)
    assert int(packed.attention_mask.sum()) == int(padded.attention_mask.sum())
    assert (packed.attention_mask.sum(1) <= 1024).all()
    assert torch.equal(packed.attention_mask, packed.segment_ids > 0)
    ours, reference = split_by_sample(packed), split_by_sample(padded)
    for key, parts in reference.items():
        assert parts["position_ids"].tolist() == list(range(len(parts["input_ids"])))
        for name, value in parts.items():
            assert torch.equal(ours[key][name], value), (key, name)


def test_packing_fills_rows_for_tts_lengths(tokens):
    """256 TTS-like samples (2-20 s of audio-out at 25 frames/s, short text) pack to >= 95 % real tokens."""
    rng = np.random.default_rng(0)
    samples = []
    for n in range(256):
        text = rng.integers(0, 300, size=int(rng.integers(20, 80)))
        ids = np.concatenate([text, [tokens.audio_out_bos, tokens.audio_out, tokens.audio_eos, tokens.eot]])
        codes = rng.integers(0, 1024, size=(8, int(rng.integers(50, 501))), dtype=np.int16)
        samples.append(TokenizedSample(f"s{n}", ids.astype(np.int32), ids.astype(np.int32), [codes]))
    batch = Collator(tokens, AUDIO, layout="packed", pack_length=4096)(samples)
    real = batch.attention_mask.sum(1)
    assert (real <= 4096).all()
    assert real.sum() / batch.attention_mask.numel() >= 0.95
    assert real.sum() == sum(s.num_expanded_tokens(AUDIO) for s in samples)
    assert sorted(batch.sample_keys) == sorted(s.key for s in samples)
    for row in range(batch.input_ids.shape[0]):  # positions restart at 0 in every segment
        starts = (batch.position_ids[row][batch.attention_mask[row]] == 0).nonzero()
        assert len(starts) == int(batch.segment_ids[row].max())


def test_sample_longer_than_pack_length_is_rejected(tokenizer, tokens):
    sample = tts(tokenizer, tokens, key="too_long", frames=(40, 40, 40))
    with pytest.raises(SampleError, match=r"^sample 'too_long': input_ids \+ audio_codes: \d+ tokens once expanded, "
                                          r"more than pack_length=100"):
        Collator(tokens, AUDIO, layout="packed", pack_length=100)([sample])


def test_bad_collator_arguments(tokens):
    with pytest.raises(ValueError, match="layout"):
        Collator(tokens, AUDIO, layout="ragged")
    with pytest.raises(ValueError, match="pack_length"):
        Collator(tokens, AUDIO, layout="packed")
    with pytest.raises(ValueError, match="pack_length"):
        Collator(tokens, AUDIO, pack_length=128)
    with pytest.raises(ValueError, match="empty"):
        Collator(tokens, AUDIO)([])
