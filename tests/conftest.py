"""Shared test fixtures: the tiny tokenizer (ids differ from the real 1280xx ids on purpose) and sample sets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from higgs_ds.data.chatml import sample_from_chatml
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.data.tokens import AudioSettings, SpecialTokens

TESTS = Path(__file__).resolve().parent
TINY_TOKENIZER = TESTS / "assets" / "tiny_tokenizer"
DATA_GOLDENS = TESTS / "goldens" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))


@pytest.fixture(scope="session")
def tokens(tokenizer) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tokenizer)


def load_sample_set(samples_jsonl: Path, tokenizer, tokens: SpecialTokens,
                    audio: AudioSettings = AudioSettings()) -> dict[str, TokenizedSample]:
    """A sample set as reference/make_data_goldens.py describes it → TokenizedSamples by key, in file order."""
    out = {}
    for line in samples_jsonl.read_text().splitlines():
        row = json.loads(line)
        out[row["key"]] = sample_from_chatml(
            row["sample"], tokenizer, tokens, audio, key=row["key"],
            load_codes=lambda ref: np.load(samples_jsonl.parent / ref.item["audio_url"], allow_pickle=False))
    return out


@pytest.fixture(scope="session")
def golden_samples(tokenizer, tokens) -> dict[str, TokenizedSample]:
    return load_sample_set(DATA_GOLDENS / "samples.jsonl", tokenizer, tokens)
