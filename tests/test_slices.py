"""Prediction-vs-label slices (higgs_ds/hooks/slices.py) checked cell by cell against the batch and the model's
predictions they came from."""
from __future__ import annotations

import re

import torch

from helpers import TINY_MODEL, text_only, tts
from higgs_ds.data.batch import IGNORE
from higgs_ds.data.collator import Collator
from higgs_ds.hooks.slices import audio_table, marked_sample, text_table
from higgs_ds.model import HiggsAudioForTraining, read_model_config

FIELDS = ("text_predictions", "text_labels", "text_positions", "audio_predictions", "audio_labels", "audio_frames",
          "audio_inputs")


def logged(tokenizer, tokens):
    config = read_model_config(TINY_MODEL, tokenizer)
    torch.manual_seed(0)
    model = HiggsAudioForTraining(config)
    samples = [tts(tokenizer, tokens, key="clone", frames=(3, 4, 6), start_index=3),
               text_only(tokenizer, tokens, key="chat")]
    batch = Collator(tokens, config.audio, layout="packed", pack_length=200)(samples)
    assert batch.segment_ids.max() == 2, "both samples in one row"
    out = model(**batch.model_inputs(), return_predictions=True, num_logged=6)
    p = {name: getattr(out, name) for name in FIELDS}
    p.update(sample_keys=batch.sample_keys, input_ids=batch.input_ids, label_ids=batch.label_ids,
             segment_ids=batch.segment_ids, audio_out_mask=batch.audio_out_mask)
    return batch, p


def rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]


def test_text_slice_matches_the_batch(tokenizer, tokens):
    batch, p = logged(tokenizer, tokens)
    table = rows(text_table(p, tokenizer))
    assert len(table) == len(p["text_positions"]) == 6
    seq_len = batch.input_ids.shape[1]
    for (key, where, label, predicted, hit), position, prediction in zip(table, p["text_positions"].tolist(),
                                                                        p["text_predictions"].tolist()):
        row, column = (int(x) for x in where.split(", "))
        assert row * seq_len + column == position + 1
        target = int(batch.label_ids[row, column])
        assert target != IGNORE, "only learnable positions"
        assert label == tokenizer.decode([target]).replace("\n", "\\n").replace("|", "\\|")
        assert predicted == tokenizer.decode([prediction]).replace("\n", "\\n").replace("|", "\\|")
        assert hit == ("✓" if prediction == target else "✗")
        segment = int(batch.segment_ids[row, column])
        assert key == batch.sample_keys[segment - 1]


def test_audio_slice_shows_inputs_labels_and_predictions_per_codebook(tokenizer, tokens):
    batch, p = logged(tokenizer, tokens)
    table = rows(audio_table(p))
    k = batch.audio_out_ids.shape[0]
    assert len(table) == len(p["audio_frames"]) * k
    for n, (key, frame, codebook, x, label, predicted, hit) in enumerate(table):
        j, cb = int(frame), int(codebook)
        assert key == "clone" and cb == n % k
        assert int(x) == int(batch.audio_out_ids[cb, j])
        expected = int(batch.audio_out_labels[cb, j + 1])  # the shift: frame j predicts frame j + 1
        assert label == str(expected)
        assert int(predicted) == int(p["audio_predictions"][n // k, cb])
        assert hit == ("" if expected == IGNORE else "✓" if int(predicted) == expected else "✗")
    first = [r for r in table if r[1] == table[0][1]]
    assert {r[3] for r in first} == {"1024"}, "a segment's first frame holds stream bos in every codebook"
    assert [r[4] for r in first][1:] == ["-100"] * (k - 1), "the delay pattern: later codebooks start later"
    assert "1025" in {r[4] for r in table}, "the last frames' labels end in stream eos"


def test_marked_sample_shows_learnable_spans_and_audio(tokenizer, tokens):
    batch, p = logged(tokenizer, tokens)
    text = marked_sample(p, tokenizer)
    assert text.startswith("sample clone:")
    assert re.search(r"<audio-out ×\d+>", text) and "⟦" in text and "⟧" in text
    assert "Again." in text  # the prompt is shown, unmarked
    assert not re.search(r"⟦[^⟧]*Again\.", text)


def test_a_target_of_minus_100_is_shown_not_decoded(tokenizer, tokens):
    batch, p = logged(tokenizer, tokens)
    p["text_labels"] = p["text_labels"].clone()
    p["text_labels"][0] = IGNORE
    assert rows(text_table(p, tokenizer))[0][2] == "-100"
