"""Shared fixtures (built with helpers.py): the tiny tokenizer and its special tokens, the golden sample set, the
launch tests' corpus and pretrained checkpoint; and after every test, the /dev/shm buffers its launches left.

The data-tool modules (test_shards, test_data_tools_errors, test_codec_encode) define a `corpus` fixture of their
own (a ChatML source), which overrides the launch corpus here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import processes
from helpers import DATA_GOLDENS, TINY_MODEL, load_sample_set, make_samples, tiny_tokenizer, write_split
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.data.tokens import SpecialTokens
from higgs_ds.model import HiggsAudioForTraining, read_model_config
from higgs_ds.model.checkpoint import save_checkpoint


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tokens(tokenizer) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tokenizer)


@pytest.fixture(scope="session")
def golden_samples(tokenizer, tokens) -> dict[str, TokenizedSample]:
    return load_sample_set(DATA_GOLDENS / "samples.jsonl", tokenizer, tokens)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer, tokens) -> Path:
    """What the launch tests train on: model/config.json (TINY_MODEL), train/ (80 samples in 4 shards of 20) and
    val/ (16 samples) shard splits."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text(json.dumps(TINY_MODEL))
    samples = make_samples(96, tokenizer, tokens, seed=0)
    write_split(root / "train", samples[:80], (20, 20, 20, 20), tokenizer, tokens)
    write_split(root / "val", samples[80:], (16,), tokenizer, tokens)
    return root


@pytest.fixture(scope="module")
def pretrained(corpus, tokenizer, tmp_path_factory) -> Path:
    """A 'pretrained' checkpoint of the corpus's model: its random init with another seed, in the boson layout (as
    the release is; the docs' LoRA commands start from a port-layout export)."""
    model_config = read_model_config(corpus / "model", tokenizer)
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pretrained")
    save_checkpoint(HiggsAudioForTraining(model_config).state_dict(), model_config, path, layout="boson")
    return path


@pytest.fixture(autouse=True)
def no_leftover_shared_memory():
    """Ranks unlink their DeepSpeed /dev/shm all-reduce buffer (≈ 66 MiB of RAM) once the process group forms; a
    launch killed before that, or a script of the tests' own that forms a group otherwise, can leave one: after the
    test, remove those of its launches, and only those."""
    yield
    processes.remove_shared_memory()
