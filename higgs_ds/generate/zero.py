"""Generation from every rank of a ZeRO-3 run (a probe inside the training loop): rank r takes prompts[r::world],
rank 0 gets every result. Two modes (docs/generate.md):
  * "lockstep": the partitioned model itself. Each generated position all-gathers every layer's weights;
    decode's lockstep keeps the ranks' forwards in step (a rank without work runs dummy forwards).
  * "gathered": a full replica on every rank, its weights all-gathered once, one tensor at a time; then no
    collective until the results are gathered. Costs a whole model per rank beside training's state.
A model that is not partitioned (ZeRO-2, one process) works in both modes: its weights are copied as they are."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist

from ..data.tokens import SpecialTokens
from .decode import Generation, SamplingConfig, generate
from .prompts import Prompt

MODES = ("lockstep", "gathered")


def stop_trace_recording(module: torch.nn.Module) -> None:
    """Before lockstep generation on a ZeRO-3 module. DeepSpeed records the order in which modules fetch their
    weights from one forward of the root module to the next (its prefetch trace), then replays it. Generation calls
    submodules, never the root: while a trace is being recorded (the first step, and the step after the trace was
    dropped) it would take in every generated position, and every release in the next steps would scan it (tens of
    times slower). Two empty root forwards close any recording; generation then contradicts the trace, DeepSpeed
    drops it, and the next training step records a fresh one. A no-op for a model not partitioned."""
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        return
    own = module.__dict__.get("forward")
    module.forward = lambda *args, **kwargs: None  # the root's hooks run, the model does not
    try:
        for _ in range(2):
            module()
    finally:
        del module.forward
        if own is not None:
            module.forward = own


def same_architecture(module: torch.nn.Module) -> torch.nn.Module:
    """A fresh, un-partitioned HiggsAudioForTraining built like `module`: its model config, loss config, attention
    and head implementations, and the PEFT adapters injected into it (PEFT keeps their LoraConfig on the model), so
    parameter names match by construction."""
    from ..model import HiggsAudioForTraining

    replica = HiggsAudioForTraining(module.model_config, module.loss_config,
                                    attn_implementation=module.config._attn_implementation,
                                    head_impl=module.text_lm_head.impl)
    if getattr(module, "peft_config", None):
        from peft import inject_adapter_in_model

        for name, config in module.peft_config.items():
            inject_adapter_in_model(config, replica, adapter_name=name)
    return replica


def gathered_copy(module: torch.nn.Module, build: Callable[[], torch.nn.Module] | None = None) -> torch.nn.Module:
    """A full replica of `module` (ZeRO-3-partitioned or not) holding its current weights, for generation without
    collectives. `build()` makes the same architecture, un-partitioned (outside deepspeed.zero.Init); default
    `same_architecture(module)`. It may also return the replica of an earlier call: every parameter and buffer is
    overwritten. A collective when `module` is partitioned: every rank calls it."""
    device = next(module.parameters()).device
    # Building initialises weights from the global RNG: restore it, so training's dropout streams are as before.
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type), device:
        replica = build() if build is not None else same_architecture(module)
    if any(hasattr(p, "ds_id") for p in replica.parameters()):
        raise ValueError("gathered_copy: build() returned a ZeRO-3-partitioned module; build it outside "
                         "deepspeed.zero.Init")
    copy_weights(module, replica)
    return replica.requires_grad_(False).eval()


def copy_weights(module: torch.nn.Module, replica: torch.nn.Module) -> None:
    """Every parameter of `module` into `replica` by name, each all-gathered on its own (the peak beyond the replica
    is one full tensor), then every buffer (ZeRO-3 does not partition buffers). Dtypes follow `module`."""
    for kind, ours, theirs in (("parameters", dict(module.named_parameters()), dict(replica.named_parameters())),
                               ("buffers", dict(module.named_buffers()), dict(replica.named_buffers()))):
        if ours.keys() != theirs.keys():
            raise ValueError(f"gathered_copy: the replica's {kind} differ from the module's (only the module's: "
                             f"{sorted(ours.keys() - theirs.keys())[:3]}, only the replica's: "
                             f"{sorted(theirs.keys() - ours.keys())[:3]})")
    gathered = _gatherer(module)
    with torch.no_grad():
        replica_params = dict(replica.named_parameters())
        for name, param in module.named_parameters():  # the same order on every rank: each gather is a collective
            with gathered(param):
                _copy(name, param, replica_params[name])
        replica_buffers = dict(replica.named_buffers())
        for name, buffer in module.named_buffers():
            _copy(name, buffer, replica_buffers[name])


def _gatherer(module: torch.nn.Module):
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        return lambda param: contextlib.nullcontext()
    import deepspeed

    return lambda param: deepspeed.zero.GatheredParameters([param])


def _copy(name: str, source: torch.Tensor, target: torch.Tensor) -> None:
    if source.shape != target.shape:
        raise ValueError(f"gathered_copy: {name} is {list(source.shape)} in the module, {list(target.shape)} in "
                         "the replica")
    if source.dtype == target.dtype:
        target.copy_(source)  # in place: no second full-size allocation
    else:  # a bf16 engine: the replica computes in the module's dtype, as lockstep does
        target.data = source.detach().to(target.device, copy=True)


def generate_on_ranks(model: torch.nn.Module, prompts: list[Prompt], tokens: SpecialTokens,
                      sampling: SamplingConfig = SamplingConfig(), mode: str = "lockstep",
                      build: Callable[[], torch.nn.Module] | None = None, batch_size: int = 8,
                      use_cache: bool = True) -> list[Generation]:
    """Every rank calls it with the same prompts and the engine's module (`engine.module`); rank r generates
    prompts[r::world]. Returns every Generation in prompt order on rank 0, [] on the others. `build`: see
    `gathered_copy` ("gathered" mode only)."""
    if mode not in MODES:
        raise ValueError(f"generate_on_ranks: mode must be one of {MODES}, got {mode!r}")
    if len({p.id for p in prompts}) != len(prompts):  # before any collective: every rank refuses alike
        raise ValueError("prompt ids must be unique")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = prompts[rank::world]
    if mode == "lockstep":
        stop_trace_recording(model)
        done = generate(model, mine, tokens, sampling, batch_size, use_cache, lockstep=True)
    else:
        replica = gathered_copy(model, build)
        done = generate(replica, mine, tokens, sampling, batch_size, use_cache)
        del replica
    every = [None] * world if rank == 0 else None
    dist.gather_object(done, every, dst=0)
    if rank != 0:
        return []
    return [every[i % world][i // world] for i in range(len(prompts))]
