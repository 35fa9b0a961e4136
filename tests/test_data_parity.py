"""Our ChatML tokens and collated batches equal upstream boson-multimodal's, tensor for tensor.

Goldens come from reference/make_data_goldens.py; HIGGS_DS_DATA_GOLDENS=<goldens.npz> replays another
(held-out) set written by the same script.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from helpers import DATA_GOLDENS, load_sample_set
from higgs_ds.data.chatml import tokenize_chatml
from higgs_ds.data.collator import Collator
from higgs_ds.data.tokens import AudioSettings, SpecialTokens

GOLDENS = Path(os.environ.get("HIGGS_DS_DATA_GOLDENS", DATA_GOLDENS / "goldens.npz"))
INDEX = json.loads(GOLDENS.with_suffix(".json").read_text())
SAMPLES = GOLDENS.parent / INDEX["samples"]
ROWS = {row["key"]: row["sample"] for row in map(json.loads, SAMPLES.read_text().splitlines())}
EXACT_FIELDS = ("input_ids", "attention_mask", "label_ids", "audio_in_mask", "audio_out_mask", "audio_in_ids",
                "audio_out_ids", "audio_out_labels")


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDENS, allow_pickle=False) as npz:
        return dict(npz)


@pytest.fixture(scope="module")
def set_tokenizer():
    return AutoTokenizer.from_pretrained(str(GOLDENS.parent / INDEX["tokenizer"]))


@pytest.fixture(scope="module")
def set_tokens(set_tokenizer):
    return SpecialTokens.from_tokenizer(set_tokenizer)


@pytest.fixture(scope="module")
def set_samples(set_tokenizer, set_tokens):
    return load_sample_set(SAMPLES, set_tokenizer, set_tokens)


def test_golden_set_is_complete():
    assert set(INDEX["chatml"]) == set(ROWS)
    assert {k for case in INDEX["cases"] for k in case["keys"]} == set(ROWS)
    assert {case["use_delay_pattern"] for case in INDEX["cases"]} == {True, False}


@pytest.mark.parametrize("key", list(ROWS))
def test_chatml_tokens_match_upstream(key, golden, set_tokenizer, set_tokens):
    ours = tokenize_chatml(ROWS[key], set_tokenizer, set_tokens, key=key)
    np.testing.assert_array_equal(ours.input_ids, golden[f"chatml/{key}/input_ids"])
    np.testing.assert_array_equal(ours.label_ids, golden[f"chatml/{key}/label_ids"])
    assert [a.item["audio_url"] for a in ours.audio] == INDEX["chatml"][key]["audio_urls"]
    assert ours.speaker == INDEX["chatml"][key]["speaker"]


@pytest.mark.parametrize("case", INDEX["cases"], ids=[c["name"] for c in INDEX["cases"]])
def test_collated_batch_matches_upstream(case, golden, set_samples, set_tokens):
    audio = AudioSettings(num_codebooks=INDEX["num_codebooks"], use_delay_pattern=case["use_delay_pattern"])
    batch = Collator(set_tokens, audio, layout="padded", round_to=1)([set_samples[k] for k in case["keys"]])
    for field in EXACT_FIELDS:
        expected = torch.from_numpy(golden[f"{case['name']}/{field}"])
        ours = getattr(batch, field)
        assert ours.shape == expected.shape, field
        assert torch.equal(ours.to(expected.dtype), expected), field
    real = batch.attention_mask
    # Upstream fills padding positions with 1; the Batch contract says 0.
    expected_positions = torch.from_numpy(golden[f"{case['name']}/position_ids"])
    assert torch.equal(batch.position_ids[real], expected_positions[real])
    assert not batch.position_ids[~real].any()
    assert torch.equal(batch.segment_ids, real.int())
    assert batch.sample_keys == case["keys"]
