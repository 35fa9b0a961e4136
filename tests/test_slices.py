"""Prediction-vs-label slices (higgs_ds/hooks/slices.py) checked cell by cell against the batch they came from, the
samples' own codes (the de-delay, independently of the collator) and the model's full logits, on held-out random
batches (several seeds, packed and padded); a planted copy-the-input model must read as copying."""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from helpers import AUDIO, TINY_MODEL, chat_sample, randomize, text_only, tts
from higgs_ds.data.batch import IGNORE, Batch
from higgs_ds.data.collator import Collator
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.hooks.base import step_predictions
from higgs_ds.hooks.slices import AUDIO_ROWS, TEXT_ROWS, audio_table, marked_sample, text_table
from higgs_ds.model import HiggsAudioForTraining, read_model_config

LAYOUTS = [("packed", 0), ("packed", 1), ("padded", 2), ("padded", 3)]


@dataclass
class Logged:
    samples: dict[str, TokenizedSample]
    batch: Batch
    p: dict  # what the trainer hands the hooks (step_predictions)
    text_logits: torch.Tensor  # [B*L, vocab]
    audio_logits: torch.Tensor  # [N_out, K, ids per codebook]


def logged(tokenizer, tokens, seed: int, layout: str, audio=AUDIO, text_samples: bool = True) -> Logged:
    rng = np.random.default_rng(seed)

    def frames():
        return tuple(int(n) for n in rng.integers(2, 12, size=3))

    samples = [tts(tokenizer, tokens, key="clone", frames=frames(), start_index=3, seed=seed),  # "ref" not trained
               tts(tokenizer, tokens, key="both", frames=frames(), seed=seed + 100)]  # two trained audio-out turns
    if text_samples:
        samples += [text_only(tokenizer, tokens, key="chat"),
                    chat_sample(tokenizer, tokens, "story", [{"role": "user", "content": "Tell me."},
                                                             {"role": "assistant",
                                                              "content": "Once upon a time a tiny model sang."}], [])]
    rng.shuffle(samples)
    config = read_model_config(TINY_MODEL, tokenizer)
    model = HiggsAudioForTraining(config)
    randomize(model, seed)
    batch = Collator(tokens, audio, layout=layout, pack_length=300 if layout == "packed" else None)(samples)
    out = model(**batch.model_inputs(), return_predictions=True)
    logits = model.logits(**batch.model_inputs())
    return Logged({s.key: s for s in samples}, batch, step_predictions(out, batch, audio),
                  logits.text.flatten(0, 1), logits.audio)


def rows(table: str) -> list[list[str]]:
    """The cells of the table's body (after its |---| line)."""
    lines = table.splitlines()
    body = lines[next(n for n, line in enumerate(lines) if line.startswith("|---")) + 1:]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in body]


def counts(table: str) -> dict[str, str]:
    """The header line's counts: learnable, prediction = input, labels = input, prediction = label."""
    match = re.match(r"(\d+) learnable .* · \*\*prediction = input: (\d+%)\*\* \(labels = input: (\d+%)\) · "
                     r"prediction = label: (\d+%)$", table.splitlines()[0])
    assert match, table.splitlines()[0]
    return dict(zip(("learnable", "prediction = input", "labels = input", "prediction = label"), match.groups()))


def share(part: torch.Tensor) -> str:
    return f"{float(part.float().mean()):.0%}"


def flat_position(batch: Batch, key: str, position: int) -> int:
    """The flat batch position of `position` in sample `key` (samples start where position_ids is 0, row-major)."""
    starts = ((batch.segment_ids > 0) & (batch.position_ids == 0)).flatten().nonzero().squeeze(1)
    return int(starts[batch.sample_keys.index(key)]) + position


def shown(tokenizer, token_id: int) -> str:
    """A token as its cell should read: visible spaces, escaped line breaks and control characters, escaped pipes."""
    escapes = {"\n": "\\n", "\r": "\\r", "\t": "\\t", " ": "␣", "|": "\\|"}
    return "".join(escapes.get(ch, ch if ch.isprintable() else ch.encode("unicode_escape").decode())
                   for ch in tokenizer.decode([token_id])) or "∅"


def learnable_text_positions(batch: Batch) -> list[int]:
    """Flat positions t whose label at t + 1 (same sample) is learnable: what the text head predicts from."""
    segments, labels = batch.segment_ids.flatten(), batch.label_ids.flatten()
    seq_len = batch.input_ids.shape[1]
    return [t for t in range(segments.numel() - 1) if (t + 1) % seq_len and segments[t] > 0
            and segments[t + 1] == segments[t] and labels[t + 1] != IGNORE]


def trained_segments(sample: TokenizedSample, tokens, audio) -> list[tuple[int, np.ndarray]]:
    """(position in the sample of the segment's first frame, its codes [K, T]) of each trained audio-out segment,
    from the sample alone: each placeholder expands to audio.frames(T) positions."""
    out, shift = [], 0
    for n, at in enumerate(sample.placeholder_positions(tokens)):
        codes = sample.audio_codes[n]
        if sample.input_ids[at] == tokens.audio_out and sample.label_ids[at] >= 0:
            out.append((int(at) + shift, codes))
        shift += audio.frames(codes.shape[1]) - 1
    return out


@pytest.mark.parametrize("layout, seed", LAYOUTS)
def test_text_slice_matches_the_batch_and_the_logits(tokenizer, tokens, layout, seed):
    run = logged(tokenizer, tokens, seed, layout)
    batch, table = run.batch, text_table(run.p, tokenizer)
    learnable = learnable_text_positions(batch)
    inputs, labels = batch.input_ids.flatten(), batch.label_ids.flatten()
    top1 = run.text_logits.argmax(-1)
    where = torch.tensor(learnable)
    assert counts(table) == {"learnable": str(len(learnable)),
                             "prediction = input": share(top1[where] == inputs[where]),
                             "labels = input": share(labels[where + 1] == inputs[where]),
                             "prediction = label": share(top1[where] == labels[where + 1])}
    shown_at = []
    for key, j, x, y, z, hit, copies in rows(table):
        t = flat_position(batch, key, int(j))
        shown_at.append(learnable.index(t))  # only learnable positions
        assert x == shown(tokenizer, int(inputs[t]))
        assert y == shown(tokenizer, int(labels[t + 1]))
        assert z == shown(tokenizer, int(top1[t]))
        assert hit == ("✓" if top1[t] == labels[t + 1] else "✗")
        assert copies == ("copy" if top1[t] == inputs[t] else "")
    assert len(learnable) > TEXT_ROWS and len(shown_at) == TEXT_ROWS
    gaps = np.diff(shown_at)
    assert shown_at[0] == 0 and shown_at[-1] == len(learnable) - 1 and gaps.min() >= gaps.max() - 1, \
        "rows spread evenly over the learnable text, edges included"


@pytest.mark.parametrize("delay", [True, False])
@pytest.mark.parametrize("layout, seed", LAYOUTS)
def test_audio_slice_rows_are_each_segments_codes_de_delayed(tokenizer, tokens, layout, seed, delay):
    audio = replace(AUDIO, use_delay_pattern=delay)
    run = logged(tokenizer, tokens, seed, layout, audio)
    batch, table = run.batch, audio_table(run.p)
    k = audio.num_codebooks
    shift = np.arange(k) if delay else np.zeros(k, dtype=int)
    learnable = batch.audio_out_labels != IGNORE
    assert not learnable[:, 0].any()  # so every label column c >= 1 is predicted from column c - 1
    before = run.audio_logits.argmax(-1).T[:, :-1]  # [K, N_out - 1]: the prediction for column c + 1
    inputs, labels = batch.audio_out_ids[:, :-1], batch.audio_out_labels[:, 1:]
    assert counts(table) == {"learnable": str(int(learnable.sum())),
                             "prediction = input": share((before == inputs)[labels != IGNORE]),
                             "labels = input": share((labels == inputs)[labels != IGNORE]),
                             "prediction = label": share((before == labels)[labels != IGNORE])}
    name = {audio.stream_bos_id: "bos", audio.stream_eos_id: "eos"}
    trained = {(key, at): codes for key in batch.sample_keys
               for at, codes in trained_segments(run.samples[key], tokens, audio)}
    expected_rows = [(key, at, t) for key in batch.sample_keys for at, codes in trained_segments(run.samples[key],
                                                                                                 tokens, audio)
                     for t in range(codes.shape[1] + 1)]
    frame_of = torch.cumsum(batch.audio_out_mask.flatten().long(), 0) - 1  # the stream column of each position
    seen = []
    for key, at, t_of, x, y, z, hit, copies in rows(table):
        t, total = (int(v) for v in t_of.split(" of "))
        codes = trained[key, int(at)]  # a trained audio-out segment of that sample starts there
        assert total == codes.shape[1]
        # From the sample alone: input = code t - 1 (stream bos first), label = code t (stream eos last).
        want_x = [audio.stream_bos_id] * k if t == 0 else codes[:, t - 1].tolist()
        want_y = [audio.stream_eos_id] * k if t == total else codes[:, t].tolist()
        assert x.split() == [name.get(v, str(v)) for v in want_x]
        assert y.split() == [name.get(v, str(v)) for v in want_y]
        # The same codes in the batch: codebook k at stream column s + t + shift_k, its label at the next column.
        s = int(frame_of[flat_position(batch, key, int(at))])
        columns = torch.tensor(s + t + shift)
        assert batch.audio_out_ids[torch.arange(k), columns].tolist() == want_x
        assert batch.audio_out_labels[torch.arange(k), columns + 1].tolist() == want_y
        predicted = run.audio_logits[columns, torch.arange(k)].argmax(-1).tolist()
        assert z.split() == [name.get(v, str(v)) for v in predicted]
        assert hit == "".join("✓" if a == b else "✗" for a, b in zip(predicted, want_y))
        assert copies == f"{sum(a == b for a, b in zip(predicted, want_x))}/{k}"
        seen.append(expected_rows.index((key, int(at), t)))
    assert len(expected_rows) > AUDIO_ROWS and len(seen) == AUDIO_ROWS
    gaps = np.diff(seen)
    assert seen[0] == 0 and seen[-1] == len(expected_rows) - 1 and gaps.min() >= gaps.max() - 1, \
        "rows spread evenly over every trained segment's codes, first and last included"
    assert "-100" not in "\n".join("|".join(r) for r in rows(table))


@pytest.mark.parametrize("layout, seed", LAYOUTS)
def test_a_copying_model_reads_as_copying_and_a_right_one_does_not(tokenizer, tokens, layout, seed):
    run = logged(tokenizer, tokens, seed, layout)
    p, k = run.p, AUDIO.num_codebooks
    copying = dict(p, audio_predictions=p["audio_inputs"].clone(),
                   text_predictions=p["input_ids"].flatten()[p["text_positions"]])
    text, audio = text_table(copying, tokenizer), audio_table(copying)
    assert counts(text)["prediction = input"] == counts(audio)["prediction = input"] == "100%"
    assert {r[-1] for r in rows(text)} == {"copy"} and {r[-1] for r in rows(audio)} == {f"{k}/{k}"}
    right = dict(p, audio_predictions=p["audio_labels"].clone(), text_predictions=p["text_labels"].clone())
    text, audio = text_table(right, tokenizer), audio_table(right)
    assert counts(text)["prediction = label"] == counts(audio)["prediction = label"] == "100%"
    assert counts(text)["prediction = input"] == counts(text)["labels = input"]
    assert counts(audio)["prediction = input"] == counts(audio)["labels = input"]
    assert int(counts(audio)["labels = input"][:-1]) <= 2  # random codes: a label rarely equals its input
    assert {r[-2] for r in rows(audio)} == {"✓" * k} and {r[-2] for r in rows(text)} == {"✓"}


def test_no_minus_100_without_its_reason_in_the_row(tokenizer, tokens):
    tables = []
    for layout, seed in LAYOUTS:
        p = logged(tokenizer, tokens, seed, layout).p
        tables += [text_table(p, tokenizer), audio_table(p)]
        planted = dict(p, text_labels=p["text_labels"].clone())
        planted["text_labels"][0] = IGNORE  # a target the model was not given to learn
        table = text_table(planted, tokenizer)
        assert rows(table)[0][3] == "-100 (not learnable)" and rows(table)[0][5] == ""
        tables.append(table)
    for table in tables:
        for row in rows(table):
            assert not re.search(r"-100(?! \(not learnable\))", " | ".join(row)), row


def test_a_batch_without_learnable_audio_says_so(tokenizer, tokens):
    config = read_model_config(TINY_MODEL, tokenizer)
    batch = Collator(tokens, config.audio)([text_only(tokenizer, tokens, key="chat")])
    p = step_predictions(HiggsAudioForTraining(config)(**batch.model_inputs(), return_predictions=True), batch,
                         config.audio)
    assert audio_table(p) == "no learnable audio in this micro-batch"
    assert [r[0] for r in rows(text_table(p, tokenizer))] == ["chat"] * len(p["text_positions"])


def test_marked_sample_shows_learnable_spans_and_audio(tokenizer, tokens):
    config = read_model_config(TINY_MODEL, tokenizer)
    samples = [tts(tokenizer, tokens, key="clone", frames=(3, 4, 6), start_index=3),
               text_only(tokenizer, tokens, key="chat")]
    batch = Collator(tokens, config.audio, layout="packed", pack_length=200)(samples)
    p = step_predictions(HiggsAudioForTraining(config)(**batch.model_inputs(), return_predictions=True), batch,
                         config.audio)
    text = marked_sample(p, tokenizer)
    assert text.startswith("sample clone:")
    assert re.search(r"<audio-out ×\d+>", text) and "⟦" in text and "⟧" in text
    assert "Again." in text  # the prompt is shown, unmarked
    assert not re.search(r"⟦[^⟧]*Again\.", text)


@pytest.mark.parametrize("layout, seed", LAYOUTS[:2])
def test_an_unshifted_loss_still_shows_its_audio_rows_copying(tokenizer, tokens, layout, seed, monkeypatch):
    """The classic leak (labels at t compared with the logits at t) moves every audio label one frame, onto the
    delay ramp's -100 for row 0: the table must still show the segment's rows, and them equal to their inputs."""
    from higgs_ds.model import modeling
    from higgs_ds.model.losses import Targets

    def unshifted(label_ids, audio_out_labels, index):
        return Targets(text=label_ids.flatten()[index.text_target_positions],
                       audio=audio_out_labels[:, index.audio_target_frames].T)

    monkeypatch.setattr(modeling, "next_token_targets", unshifted)
    p = logged(tokenizer, tokens, seed, layout).p
    table = audio_table(dict(p, audio_predictions=p["audio_inputs"].clone()))
    assert counts(table)["labels = input"] == counts(table)["prediction = input"] == "100%"
    assert rows(table) and {r[-1] for r in rows(table)} == {f"{AUDIO.num_codebooks}/{AUDIO.num_codebooks}"}
    for row in rows(table):
        assert row[3] == row[4], row  # every label is its own input
