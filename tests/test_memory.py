"""higgs_ds/train/memory.py: DeepSpeed's own estimators when everything trains, exact frozen-parameter savings."""
from __future__ import annotations

import contextlib
import io

import pytest
import torch

from higgs_ds.train.memory import count_params, format_estimate, model_states_estimate

RELEASE = (5_771_372_544, 393_990_144)  # odd-sized on purpose: DeepSpeed's int() rounding must be followed


def deepspeed_estimate(stage, total, largest, gpus, nodes, offload_optimizer, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    with contextlib.redirect_stdout(io.StringIO()):
        if stage == 3:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, offload_optimizer,
                                                                offload_param)
        else:
            cpu, gpu = estimate_zero2_model_states_mem_needs(total, gpus, nodes, offload_optimizer)
    return gpu, cpu


COMBOS = [(3, False, False), (3, True, False), (3, True, True), (2, False, False), (2, True, False)]


@pytest.mark.parametrize("stage, offload_optimizer, offload_param", COMBOS)
@pytest.mark.parametrize("gpus, nodes", [(1, 1), (2, 1), (3, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("total, largest", [RELEASE, (1_000_003, 77_777), (12, 5)])
def test_all_trainable_equals_deepspeed(stage, offload_optimizer, offload_param, gpus, nodes, total, largest):
    e = model_states_estimate(total, total, largest, gpus, nodes, stage, offload_optimizer, offload_param)
    assert (e["device_bytes"], e["cpu_bytes"]) == deepspeed_estimate(stage, total, largest, gpus, nodes,
                                                                     offload_optimizer, offload_param)
    assert 0 <= e["device_bytes"] - sum(e["device_parts"].values()) <= 1


def test_lora_case_by_hand():
    # 1000 M parameters of which 10 M train (adapters + extras), largest layer 100 M, ZeRO-3 bf16 on 8 GPUs:
    # frozen 990 M x 2 B / 8 + trainable 10 M x (2 + 16) B / 8 + gathered 100 M x 4 B.
    e = model_states_estimate(1000 * 10 ** 6, 10 ** 7, 10 ** 8, 8)
    assert e["device_bytes"] == 990 * 10 ** 6 * 2 // 8 + 10 ** 7 * 18 // 8 + 4 * 10 ** 8 == 670_000_000
    assert e["device_parts"] == {"params": 250_000_000, "grads_and_optimizer": 20_000_000,
                                 "gathered_layer": 400_000_000}
    assert e["cpu_bytes"] == 10 ** 8 * 4 * 8 * 1.5  # zero.Init buffer: independent of what trains
    # the same under ZeRO-2: parameters replicated (2 B each on every GPU), 18 B / trainable / 8
    two = model_states_estimate(1000 * 10 ** 6, 10 ** 7, 10 ** 8, 8, stage=2)
    assert two["device_bytes"] == 2 * 1000 * 10 ** 6 + 18 * 10 ** 7 // 8 == 2_022_500_000
    # fp32 ZeRO-3 (the CPU config): 4 B per parameter, 16 more per trainable one, gathered layer 8 B
    fp32 = model_states_estimate(1000 * 10 ** 6, 10 ** 7, 10 ** 8, 2, precision="fp32")
    assert fp32["device_bytes"] == (4 * 10 ** 9 + 16 * 10 ** 7) // 2 + 8 * 10 ** 8


@pytest.mark.parametrize("stage, offload_optimizer, offload_param", COMBOS)
def test_frozen_parameters_save_exactly_their_states(stage, offload_optimizer, offload_param):
    total, frozen, largest, gpus = 8_000_000, 6_400_000, 500_000, 8  # divisible: no rounding in the difference
    full = model_states_estimate(total, total, largest, gpus, 1, stage, offload_optimizer, offload_param)
    part = model_states_estimate(total, total - frozen, largest, gpus, 1, stage, offload_optimizer, offload_param)
    states = 18 if stage == 2 else 16
    on_device = not offload_optimizer
    assert full["device_bytes"] - part["device_bytes"] == (states * frozen // gpus if on_device else 0)
    if offload_optimizer and stage == 3:
        assert full["cpu_bytes"] - part["cpu_bytes"] == 16 * frozen * 1.5
    elif offload_optimizer:  # ZeRO-2: max(fp32 load buffers 4 B x total x 8 GPUs, 16 B x trainable): the former
        assert full["cpu_bytes"] == part["cpu_bytes"] == total * 4 * gpus * 1.5
    else:
        assert full["cpu_bytes"] == part["cpu_bytes"]
    assert part["device_parts"]["params"] == full["device_parts"]["params"]  # a frozen parameter keeps its bytes


def test_refusals():
    with pytest.raises(ValueError, match="no trainable parameter"):
        model_states_estimate(1000, 0, 10, 1)
    with pytest.raises(ValueError, match="trainable"):
        model_states_estimate(1000, 1001, 10, 1)
    with pytest.raises(ValueError, match="offload_param"):
        model_states_estimate(1000, 1000, 10, 1, stage=2, offload_optimizer=True, offload_param=True)
    with pytest.raises(ValueError, match="offload_param"):
        model_states_estimate(1000, 1000, 10, 1, offload_param=True)
    with pytest.raises(ValueError, match="precision"):
        model_states_estimate(1000, 1000, 10, 1, precision="fp8")


def test_count_params_on_meta_with_lora_and_shared_weights():
    from higgs_ds.model import HiggsAudioForTraining
    from higgs_ds.train.lora import inject_lora, lora_targets
    from helpers import tiny_config

    with torch.device("meta"):
        model = HiggsAudioForTraining(tiny_config())  # hidden 32, vocab 416, 4 x 34 audio ids
        inject_lora(model, lora_targets(model, "attention", rank=4), rank=4, alpha=8)
    counts = count_params(model)
    # adapters: per layer q,o 32->32, k,v 32->16: r x (in + out) = 4 x (64 + 64 + 48 + 48) = 896; 2 layers
    assert counts.trainable == 2 * 896
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.largest_layer == 416 * 32  # the text embedding = the text head
    model.text_lm_head.weight = model.model.embed_tokens.weight  # tied: counted once
    assert count_params(model).total == counts.total - 416 * 32
    line = format_estimate(model_states_estimate(*counts, 8))
    assert line.startswith("ZeRO-3 bf16 8 GPU(s) x 1 node(s), no offload: 0.0 M of ") and "trainable (" in line
