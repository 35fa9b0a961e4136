"""Model-state memory of ZeRO-2 / ZeRO-3 training with frozen parameters (LoRA, partial fine-tuning).

DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs` take one parameter count and treat every parameter as
trained (gradient + fp32 master + Adam moments). `model_states_estimate` splits it: with trainable == total it
returns exactly DeepSpeed 0.19.8's numbers (tests/test_memory.py checks them), and a frozen parameter costs only its
own bytes (2 B in bf16/fp16, 4 B in fp32; partitioned under ZeRO-3, replicated under ZeRO-2) — no gradient, no
optimizer state."""
from __future__ import annotations

from typing import NamedTuple

import torch

PARAM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
BUFFER_FACTOR = 1.5  # DeepSpeed's additional_buffer_factor on every CPU figure
GIB = 2 ** 30


class ParamCounts(NamedTuple):
    total: int
    trainable: int
    largest_layer: int  # the largest module's own (non-recursive) parameters, as DeepSpeed's model_to_params


def count_params(model: torch.nn.Module) -> ParamCounts:
    """(total, trainable, largest layer) of `model`; works on the meta device. Shared parameters count once
    (by identity: on meta every data_ptr is 0, so DeepSpeed's data_ptr de-duplication would not work)."""
    params = list(model.parameters())  # already de-duplicated by identity
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamCounts(sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad), largest)


def model_states_estimate(total_params: int, trainable_params: int, largest_layer_params: int, gpus_per_node: int,
                          num_nodes: int = 1, stage: int = 3, offload_optimizer: bool = False,
                          offload_param: bool = False, precision: str = "bf16") -> dict:
    """Model-state bytes per GPU (`device_bytes`) and per node on the CPU (`cpu_bytes`) for ZeRO-2 / ZeRO-3 + Adam.

    Counted, N = gpus_per_node x num_nodes, P = 2 B (bf16/fp16) or 4 B (fp32) per parameter:
      every parameter     P B (ZeRO-3: partitioned over N, or offloaded; ZeRO-2: replicated on every GPU);
      trainable ones also fp32 master 4 + Adam moments 8 + fp32 gradient 4 B, partitioned over N (or on the CPU
                          when the optimizer is offloaded); ZeRO-2 in 16 bit also its 16-bit gradient partition, 2 B
                          (DeepSpeed's estimator counts that for stage 2 only; in fp32 that gradient is the fp32 one);
      ZeRO-3, per GPU     the gathered largest layer: 2 P B x largest_layer_params (DeepSpeed's 4 B in 16 bit,
                          parameter + gradient; kept for a frozen layer too, so it is conservative there);
      CPU                 DeepSpeed's figures x 1.5: offloaded states, or (no offload) the fp32 load buffer of each
                          process on the node — the largest layer under zero.Init for ZeRO-3, the whole model for
                          ZeRO-2. Offloaded ZeRO-2 states are not divided by num_nodes, and the ZeRO-2 load buffer
                          scales with all GPUs, as in DeepSpeed's estimator (kept for equality).
    Not counted: activations, the reduce / prefetch buckets, the optimizer step's and autograd's temporaries
    (e.g. the full-size weight gradient of a trained head), allocator slack and the runtime itself.
    `device_parts` splits device_bytes (each part rounded down on its own, so they may sum 1 B short)."""
    if precision not in PARAM_BYTES:
        raise ValueError(f"precision {precision!r}: expected one of {sorted(PARAM_BYTES)}")
    if stage not in (2, 3):
        raise ValueError(f"ZeRO stage {stage}: only 2 and 3 are modelled")
    if trainable_params <= 0:
        raise ValueError("no trainable parameter: nothing to train (DeepSpeed would get an empty optimizer); "
                         "check the freeze recipe / LoRA targets")
    if not 0 <= largest_layer_params <= total_params or trainable_params > total_params:
        raise ValueError(f"need 0 < trainable ({trainable_params}) <= total ({total_params}) and largest layer "
                         f"({largest_layer_params}) <= total")
    if offload_param and (stage == 2 or not offload_optimizer):
        raise ValueError("offload_param is modelled only for ZeRO-3 with offload_optimizer (as DeepSpeed's estimator)")
    p, t, n = PARAM_BYTES[precision], trainable_params, gpus_per_node * num_nodes
    states = 18 if stage == 2 and p == 2 else 16  # per trainable parameter, see above
    # The arithmetic follows DeepSpeed's own (int(a / n), float factors) so that trainable == total gives its ints.
    if stage == 3:
        gathered, per_node = 2 * p * largest_layer_params, 1 / num_nodes
        if not offload_optimizer:
            device = gathered + int((p * total_params + states * t) / n)
            parts = (int(p * total_params / n), int(states * t / n), gathered)
            cpu = largest_layer_params * 4 * gpus_per_node * BUFFER_FACTOR
            holds = "fp32 zero.Init buffer of the largest layer per process"
        elif not offload_param:
            device, parts = gathered + int(p * total_params / n), (int(p * total_params / n), 0, gathered)
            cpu = t * states * per_node * BUFFER_FACTOR
            holds = "offloaded optimizer states + fp32 gradients"
        else:
            device, parts = gathered, (0, 0, gathered)
            cpu = (p * total_params + states * t) * per_node * BUFFER_FACTOR
            holds = "offloaded parameters, optimizer states + fp32 gradients"
    else:
        replicated = p * total_params
        if not offload_optimizer:
            device, parts = replicated + int(states * t / n), (replicated, int(states * t / n), 0)
            cpu = total_params * 4 * gpus_per_node * BUFFER_FACTOR
            holds = "fp32 load buffer of the whole model per process"
        else:
            device, parts = replicated, (replicated, 0, 0)
            cpu = max(total_params * 4 * n, 16 * t) * BUFFER_FACTOR
            holds = "offloaded optimizer states + fp32 gradients (or the fp32 load buffers, the larger)"
    return {"stage": stage, "precision": precision, "gpus_per_node": gpus_per_node, "num_nodes": num_nodes,
            "offload_optimizer": offload_optimizer, "offload_param": offload_param,
            "total_params": total_params, "trainable_params": t, "frozen_params": total_params - t,
            "largest_layer_params": largest_layer_params,
            "device_bytes": int(device),
            "device_parts": dict(zip(("params", "grads_and_optimizer", "gathered_layer"), parts)),
            "cpu_bytes": int(cpu), "cpu_holds": holds}


def format_estimate(e: dict) -> str:
    """One line, e.g. for --dry-run: setup, trainable share, per-GPU bytes and their parts, per-node CPU bytes."""
    offload = "+".join(k for k in ("optimizer", "param") if e[f"offload_{k}"]) or "no"
    d = e["device_parts"]
    return (f"ZeRO-{e['stage']} {e['precision']} {e['gpus_per_node']} GPU(s) x {e['num_nodes']} node(s), {offload} "
            f"offload: {e['trainable_params'] / 1e6:,.1f} M of {e['total_params'] / 1e6:,.1f} M parameters trainable "
            f"({e['trainable_params'] / e['total_params']:.2%}); per GPU {e['device_bytes'] / GIB:.2f} GiB "
            f"(params {d['params'] / GIB:.2f} + grads/optimizer {d['grads_and_optimizer'] / GIB:.2f} + gathered "
            f"layer {d['gathered_layer'] / GIB:.2f}), CPU per node {e['cpu_bytes'] / GIB:.2f} GiB "
            f"({e['cpu_holds']}); model states only, no activations or buffers")
