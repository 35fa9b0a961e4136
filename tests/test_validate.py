"""The two validators: `TokenizedSample.validate` (where samples enter: ChatML, shard decode) and `Batch.validate`
(the Batch contract, on the CPU). Each bad case must raise naming the field and the sample; good data passes."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

from helpers import text_only, tts
from higgs_ds.data.batch import IGNORE, BatchError
from higgs_ds.data.collator import Collator
from higgs_ds.data.sample import SampleError, TokenizedSample
from higgs_ds.data.tokens import AudioSettings

AUDIO = AudioSettings()
VOCAB = 512  # above every id of the tiny tokenizer (413)
IDS_PER_CODEBOOK = AUDIO.codes_per_codebook + 2


# ------------------------------------------------------------------------------------------------ samples

def bad_codes(sample: TokenizedSample, n: int, codes: np.ndarray) -> TokenizedSample:
    changed = copy.deepcopy(sample)
    changed.audio_codes[n] = codes
    return changed


def with_id(sample: TokenizedSample, value: int, labelled: bool = False) -> TokenizedSample:
    """`value` written at the first unlabelled text position (and into its label if `labelled`)."""
    changed = copy.deepcopy(sample)
    position = int(np.flatnonzero(changed.label_ids == IGNORE)[0])
    changed.input_ids[position] = value
    if labelled:
        changed.label_ids[position] = value
    return changed


def test_tiny_vocab_bound(tokenizer):
    assert len(tokenizer) <= VOCAB


@pytest.mark.parametrize("mutate, field, why", [
    (lambda s: bad_codes(s, 1, np.zeros((9, 4), np.int16)), "audio_codes[1]", r"\[8, T>=1\], got int16 \(9, 4\)"),
    (lambda s: bad_codes(s, 0, np.zeros((8, 0), np.int16)), "audio_codes[0]", r"T>=1"),
    (lambda s: bad_codes(s, 0, np.zeros(8, np.int16)), "audio_codes[0]", r"\[8, T>=1\]"),
    (lambda s: bad_codes(s, 0, np.zeros((8, 4), np.float32)), "audio_codes[0]", r"float32"),
    (lambda s: bad_codes(s, 2, np.full((8, 4), 1024)), "audio_codes[2]", r"\[1024, 1024\], expected \[0, 1024\)"),
    (lambda s: bad_codes(s, 2, np.full((8, 4), -1)), "audio_codes[2]", r"expected \[0, 1024\)"),
    (lambda s: TokenizedSample(s.key, s.input_ids, s.label_ids, s.audio_codes[:2]), "audio_codes",
     "2 segments but input_ids hold 3"),
    (lambda s: TokenizedSample(s.key, s.input_ids, s.label_ids[:-1], s.audio_codes), "label_ids", "shaped like"),
    (lambda s: TokenizedSample(s.key, s.input_ids[:0], s.label_ids[:0], []), "input_ids", "non-empty"),
    (lambda s: TokenizedSample(s.key, s.input_ids.astype(np.float32), s.label_ids, s.audio_codes), "input_ids",
     "integer"),
    (lambda s: with_id(s, 999999), "input_ids", r"id 999999 at position \d+, expected a text id in \[0, 512\)"),
    (lambda s: with_id(s, -7), "input_ids", r"id -7 at position \d+"),
    (lambda s: with_id(s, 999999, labelled=True), "input_ids", r"id 999999"),
    (lambda s: TokenizedSample(s.key, s.input_ids, np.roll(s.label_ids, 1), s.audio_codes), "label_ids",
     r"labels must be -100 or equal to input_ids"),
])
def test_invalid_samples_are_rejected(tokenizer, tokens, mutate, field, why):
    good = tts(tokenizer, tokens, key="bad_one", frames=(4, 4, 4))
    good.validate(tokens, AUDIO, VOCAB)
    with pytest.raises(SampleError, match=rf"^sample 'bad_one': {re.escape(field)}: .*{why}") as err:
        mutate(good).validate(tokens, AUDIO, VOCAB)
    assert (err.value.key, err.value.field) == ("bad_one", field)


def test_text_ids_beyond_the_vocab_pass_only_without_a_vocab_size(tokenizer, tokens):
    sample = with_id(text_only(tokenizer, tokens), 999999)
    sample.validate(tokens, AUDIO)  # the shard format alone cannot know the vocabulary
    with pytest.raises(SampleError, match="999999"):
        sample.validate(tokens, AUDIO, VOCAB)


# ------------------------------------------------------------------------------------------------ batches

@pytest.fixture(params=["padded", "packed"])
def batch(request, tokenizer, tokens):
    samples = [tts(tokenizer, tokens, key="clone", frames=(3, 4, 5), start_index=3),
               text_only(tokenizer, tokens, key="chat"), tts(tokenizer, tokens, key="tts2", frames=(2, 6, 3))]
    collator = (Collator(tokens, AUDIO, layout="packed", pack_length=160) if request.param == "packed"
                else Collator(tokens, AUDIO))
    out = collator(samples)
    if request.param == "packed":
        assert int(out.segment_ids.max()) > 1
    return out


def validate(batch):
    batch.validate(VOCAB, IDS_PER_CODEBOOK, AUDIO.num_codebooks)


def first(mask: torch.Tensor) -> tuple[int, int]:
    row, col = (int(i) for i in mask.nonzero()[0])
    return row, col


def sample_at(batch, row: int, col: int) -> str:
    before = int(((batch.segment_ids[:row] > 0) & torch.nn.functional.pad(
        batch.segment_ids[:row, 1:] != batch.segment_ids[:row, :-1], (1, 0), value=True)).sum())
    return batch.sample_keys[before + int(batch.segment_ids[row, col]) - 1]


def unlabelled_text(batch) -> torch.Tensor:
    return (batch.label_ids == IGNORE) & batch.attention_mask & ~batch.audio_in_mask & ~batch.audio_out_mask


def put(batch, name: str, where: tuple[int, int], value) -> None:
    getattr(batch, name)[where] = value


CASES = {
    "text id too large": ("input_ids", lambda b: unlabelled_text(b), 999999, r"expected a text id in \[0, 512\)"),
    "negative text id": ("input_ids", lambda b: unlabelled_text(b), -7, r"expected a text id in \[0, 512\)"),
    "label at an audio frame": ("label_ids", lambda b: b.audio_out_mask, 5, r"expected -100 at audio frames"),
    "label at padding": ("label_ids", lambda b: ~b.attention_mask, 5, r"expected -100 at audio frames .* at padding"),
    "label out of range": ("label_ids", lambda b: b.label_ids != IGNORE, 512, r"expected -100 or a text id"),
    "position not restarted": ("position_ids", lambda b: (b.position_ids == 0) & b.attention_mask, 3,
                               r"expected 0, 1, \.\.\. within each sample"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_positions_are_named_with_their_sample(batch, case):
    validate(batch)
    name, where, value, why = CASES[case]
    mask = where(batch)
    if not mask.any():
        pytest.skip(f"this layout has no position for {case!r}")
    row, col = first(mask)
    put(batch, name, (row, col), value)
    named = f" \\(sample {sample_at(batch, row, col)!r}\\)" if batch.segment_ids[row, col] > 0 else ""
    with pytest.raises(BatchError, match=rf"^batch\.{name}\[{row}, {col}\]{named}: {why}"):
        validate(batch)


@pytest.mark.parametrize("name, frame, value, why", [
    ("audio_out_ids", 3, IDS_PER_CODEBOOK, r"= 1026: expected an id in \[0, 1026\)"),
    ("audio_in_ids", 0, -1, r"= -1: expected an id in \[0, 1026\)"),
    ("audio_out_labels", 2, -5, r"= -5: expected -100 or an id in \[0, 1026\)"),
    ("audio_out_labels", 2, IDS_PER_CODEBOOK, r"= 1026: expected -100 or an id"),
])
def test_audio_ids_out_of_range(batch, name, frame, value, why):
    getattr(batch, name)[5, frame] = value
    with pytest.raises(BatchError, match=rf"^batch\.{name}\[5, {frame}\] {why}"):
        validate(batch)


def test_mask_overlap_and_audio_in_padding(batch):
    row, col = first(batch.audio_out_mask)
    overlapping = copy.deepcopy(batch)
    overlapping.audio_in_mask[row, col] = True
    with pytest.raises(BatchError, match=rf"^batch\.audio_in_mask\[{row}, {col}\] .*overlaps audio_out_mask"):
        validate(overlapping)
    if (~batch.attention_mask).any():
        row, col = first(~batch.attention_mask)
        batch.audio_out_mask[row, col] = True
        with pytest.raises(BatchError, match=rf"\[{row}, {col}\]: an audio frame in padding"):
            validate(batch)


@pytest.mark.parametrize("name, change, why", [
    ("position_ids", lambda t: t[:, :-1], r"batch\.position_ids is torch\.int64 \[\d+, \d+\], expected torch\.int64"),
    ("segment_ids", lambda t: t.long(), r"batch\.segment_ids is torch\.int64 .*expected torch\.int32"),
    ("attention_mask", lambda t: t.long(), r"batch\.attention_mask is torch\.int64"),
    ("audio_out_ids", lambda t: t[:, 1:], r"batch\.audio_out_ids is torch\.int64 \[8, \d+\], expected torch\.int64 "
                                          r"\[8, \d+\] \(codebooks, frames in its mask\)"),
    ("audio_in_ids", lambda t: t[:7], r"batch\.audio_in_ids is torch\.int64 \[7, \d+\], expected torch\.int64 \[8, "),
    ("audio_out_labels", lambda t: t.int(), r"batch\.audio_out_labels is torch\.int32"),
])
def test_wrong_shapes_and_dtypes(batch, name, change, why):
    setattr(batch, name, change(getattr(batch, name)))
    with pytest.raises(BatchError, match=rf"^{why}"):
        validate(batch)


def test_attention_mask_must_follow_segments(batch):
    row, col = first(batch.attention_mask)
    batch.attention_mask[row, col] = False
    with pytest.raises(BatchError, match=rf"^batch\.attention_mask\[{row}, {col}\].*must equal segment_ids > 0"):
        validate(batch)


def test_sample_keys_must_name_every_segment(batch):
    batch.sample_keys = batch.sample_keys[:-1]
    with pytest.raises(BatchError, match=r"^batch\.sample_keys names 2 samples, the rows hold 3 segments"):
        validate(batch)


def test_stale_index_after_an_in_place_edit(batch):
    """Unlearning a text label in place changes the shifted targets: the carried index is stale until reindexed."""
    row, col = first(batch.label_ids != IGNORE)
    batch.label_ids[row, col] = IGNORE
    with pytest.raises(BatchError, match=r"^batch\.index does not match the tensors \(text_target_positions differ\)"):
        validate(batch)
    validate(batch.reindexed())


def test_stale_index_after_audio_labels_edit(batch):
    batch.audio_out_labels[:] = IGNORE
    with pytest.raises(BatchError, match=r"audio_target_frames, audio_target_positions differ"):
        validate(batch)
