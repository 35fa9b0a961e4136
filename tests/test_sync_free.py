"""The model's forward+backward runs without data-dependent host syncs when the Batch carries its index
(counted by higgs_ds.testing.host_syncs.DataDependentOps)."""
from __future__ import annotations

import pytest
import torch

from higgs_ds.model import HiggsAudioForTraining, LossNorm, learnable_counts
from higgs_ds.testing.host_syncs import DataDependentOps
from helpers import mixed_packed_batch, randomize, tiny_config

CONFIG = tiny_config()


def packed_batch():
    return mixed_packed_batch(CONFIG, seed=3, pad_to=60)


def count_step(model, batch, with_index: bool = True, plant=None, **forward_kwargs) -> DataDependentOps:
    inputs = batch.model_inputs()
    if not with_index:
        inputs["index"] = None
    counts = learnable_counts(batch)  # the engine builds the LossNorm before the step, on the CPU
    norm = LossNorm(text_tokens=float(counts.text), audio_tokens=counts.audio.float(), grad_scale=2.0)
    with DataDependentOps() as mode:
        out = model(**inputs, loss_norm=norm, **forward_kwargs)
        loss = out.loss if plant is None else out.loss + plant(batch)
        loss.backward()
    return mode


@pytest.fixture(scope="module")
def model():
    m = HiggsAudioForTraining(CONFIG, head_impl="chunked")
    randomize(m)
    return m.train()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_forward_backward_of_a_packed_batch_has_at_most_two_data_dependent_ops(model, checkpointing):
    model.gradient_checkpointing_enable() if checkpointing else model.gradient_checkpointing_disable()
    try:
        mode = count_step(model, packed_batch())
    finally:
        model.gradient_checkpointing_disable()
    assert mode.total > 500  # the mode saw the whole step, backward included
    assert sum(mode.found.values()) <= 2, dict(mode.found)


def test_the_materialized_head_and_predictions_stay_sync_free():
    m = HiggsAudioForTraining(CONFIG, head_impl="materialized")
    randomize(m)
    mode = count_step(m, packed_batch(), return_predictions=True)
    assert sum(mode.found.values()) <= 2, dict(mode.found)


def test_the_counter_sees_what_it_must(model):
    """Without the index the model computes it itself (nonzero, int(), bool()): the counter must see those; and a
    planted `x[mask]` — bool indexing, dispatched as aten.index with a bool index and no nonzero — is counted."""
    batch = packed_batch()
    assert sum(count_step(model, batch, with_index=False).found.values()) > 2
    baseline = sum(count_step(model, batch).found.values())

    def plant(b):
        return b.label_ids.float()[b.label_ids != -100].sum() * 0

    planted = count_step(model, batch, plant=plant)
    assert sum(planted.found.values()) == baseline + 1, dict(planted.found)
    assert any("bool index" in name for name in planted.found)
    with DataDependentOps() as mode:
        torch.arange(6).repeat_interleave(torch.tensor([1, 0, 2, 1, 1, 1]))
        bool(torch.tensor(1))
    assert sum(mode.found.values()) >= 2, dict(mode.found)
