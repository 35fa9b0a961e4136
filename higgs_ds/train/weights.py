"""Pretrained weights into a (possibly ZeRO-3-partitioned) model, one tensor at a time.

The checkpoint's safetensors headers give the plan: each port-layout weight and the stored tensor(s) it comes from
(boson names renamed; upstream's split "partially frozen" halves concatenated). Tensors are then read one at a time,
so a process holds one tensor — and, under ZeRO-3, that one parameter gathered — never a whole state dict. Under
ZeRO-3 only rank 0 reads the data and `GatheredParameters(modifier_rank=0)` scatters what it wrote to every rank's
partition; under ZeRO-2 every rank holds the whole model and reads it itself."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open

from ..model.checkpoint import (BOSON_TO_PORT, IGNORED_SUFFIXES, SPLIT_KEY, check_state_dict, expected_shapes,
                                weight_files)
from ..model_config import HiggsModelConfig

Source = tuple[Path, str]  # (safetensors file, stored key)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class PlannedWeight(NamedTuple):
    sources: list[Source]  # one stored tensor, or a split's frozen and trainable halves
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # as stored (None: not a floating-point type)


def checkpoint_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors files (checkpoint.weight_files), refusing .bin: only safetensors stream."""
    files = weight_files(path)
    if any(file.suffix != ".safetensors" for file in files):
        raise FileNotFoundError(f"{path}: streaming loads safetensors only; convert .bin checkpoints with "
                                "higgs_ds.model.save_checkpoint first")
    return files


def open_safetensors(file: Path):
    """safe_open, with a damaged file named: safetensors reports a truncated or garbled file without its path."""
    from safetensors import SafetensorError

    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as exc:
        raise ValueError(f"{file}: truncated or corrupt safetensors file ({exc})") from None


def weight_plan(path: str | Path) -> dict[str, PlannedWeight]:
    """Port-layout name → the stored tensors it is made of, its shape and stored dtype, from the safetensors
    headers alone."""
    path = Path(path)
    stored: dict[str, Path] = {}
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, torch.dtype | None] = {}
    for file in checkpoint_files(path):
        with open_safetensors(file) as handle:
            for key in handle.keys():
                if key in stored:
                    raise ValueError(f"{file}: tensor {key} also appears in {stored[key].name}")
                header = handle.get_slice(key)
                stored[key], shapes[key] = file, list(header.get_shape())
                dtypes[key] = SAFETENSORS_DTYPES.get(header.get_dtype())
    boson = not any(key.startswith("model.") for key in stored)
    plan: dict[str, PlannedWeight] = {}
    for key, file in stored.items():
        if key.endswith(IGNORED_SUFFIXES) or ((m := SPLIT_KEY.match(key)) and m["part"] == "trainable"):
            continue
        sources, shape = [(file, key)], list(shapes[key])
        if m := SPLIT_KEY.match(key):
            partner = f"{m['module']}.{m['kind']}_trainable.weight"
            if partner not in stored:
                raise ValueError(f"{path}: split tensor {key} has no partner {partner}")
            sources.append((stored[partner], partner))
            shape[0] += shapes[partner][0]
            key = f"{m['module']}.weight"
        if boson:
            for pattern, replacement in BOSON_TO_PORT:
                key = re.sub(pattern, replacement, key)
        plan[key] = PlannedWeight(sources, tuple(shape), dtypes[sources[0][1]])
    orphans = [k for k in stored if (m := SPLIT_KEY.match(k)) and m["part"] == "trainable"
               and f"{m['module']}.{m['kind']}_frozen.weight" not in stored]
    if orphans:
        raise ValueError(f"{path}: split tensors {orphans} have no *_frozen partner")
    return plan


def read_tensor(sources: list[Source]) -> torch.Tensor:
    parts = []
    for file, key in sources:
        with open_safetensors(file) as handle:
            parts.append(handle.get_tensor(key))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def load_pretrained(model: torch.nn.Module, path: str | Path, config: HiggsModelConfig, rank: int = 0,
                    zero3: bool = False, read: Callable[[list[Source]], torch.Tensor] = read_tensor) -> int:
    """Copy a checkpoint into `model` tensor by tensor (every rank calls it). Returns the number of tensors.
    Missing, unexpected or misshapen tensors are refused by name before anything is read."""
    plan = weight_plan(path)
    check_state_dict({name: planned.shape for name, planned in plan.items()}, expected_shapes(config), str(path))
    params = dict(model.named_parameters())
    for name in sorted(plan):
        tensor = read(plan[name].sources) if rank == 0 or not zero3 else None  # ZeRO-2: every rank holds it all
        if zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        params[name].data.copy_(tensor)
        else:
            with torch.no_grad():
                params[name].data.copy_(tensor)
        del tensor
    return len(plan)
