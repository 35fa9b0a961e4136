"""Counts data-dependent ops (host syncs on a GPU) under a TorchDispatchMode, forward and backward alike.

A data-dependent op is one whose output shape or Python value depends on tensor *values*: on a GPU each one stalls
the host until the device has caught up. Counted: nonzero, _local_scalar_dense (.item(), bool(), int()), equal,
masked_select, is_nonzero, unique*, repeat_interleave without output_size, and index / index_put with a boolean
index — how `x[mask]` appears under the mode (no nonzero is dispatched for it).

    with DataDependentOps() as ops:
        model(**batch.model_inputs()).loss.backward()
    assert not ops.found, ops.found
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
ALWAYS_DATA_DEPENDENT = {aten.nonzero, aten._local_scalar_dense, aten.equal, aten.masked_select, aten.is_nonzero,
                         aten.unique_dim, aten._unique, aten._unique2, aten.unique_consecutive,
                         aten.unique_dim_consecutive}
TENSOR_REPEATS = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}  # (self_int is not)
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


class DataDependentOps(TorchDispatchMode):
    """`found`: op name -> how often it ran; `total`: every op seen (a check that the mode saw the step)."""

    def __init__(self):
        super().__init__()
        self.found: Counter[str] = Counter()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        self.total += 1
        if packet in ALWAYS_DATA_DEPENDENT:
            self.found[str(func)] += 1
        elif func in TENSOR_REPEATS and kwargs.get("output_size") is None:
            self.found[str(func)] += 1
        elif packet in INDEXING and _has_bool_index(args):
            self.found[f"{func} (bool index)"] += 1
        return func(*args, **kwargs)
