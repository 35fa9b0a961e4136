"""Linear + cross-entropy heads that never hold all logits (text 128256-way, audio 8 codebooks × 1026-way).

`LinearCrossEntropyHead` owns its weight (so ZeRO-3 gathers it around this module's forward) and returns per-head
token-CE *sums* and counts; the caller normalises by global counts (docs/design.md §5).

Implementations (`impl`):
- "materialized": the plain reference: fp32 logits for all rows, F.cross_entropy(reduction="sum") per head.
- "chunked": `_FusedLinearCrossEntropy`, pure PyTorch, `chunk_tokens` rows at a time: fp32 logits, loss, argmax
  and d loss/d logits = softmax − onehot per chunk. Gradients are computed in forward and scaled by grad_output in
  backward: three matmuls per chunk, as in the materialized path, and backward does not need the weight again —
  except when the heads get different grad_outputs (see the class). Matmuls run in the input dtype; softmax, loss
  and the weight-gradient accumulator are fp32. Memory beyond one chunk: the fp32 weight gradient (the tensor
  autograd adds into .grad; the materialized path makes the same one) and grad_hidden, held from forward to backward.
- "liger": Liger's fused kernel per head, on CUDA when `liger_kernel` imports; otherwise "chunked". Calls asking
  for predictions, or with zero rows, use "chunked" (Liger returns no argmax; zero-row launches are not its
  contract).
- "auto": "liger" where it applies, else "chunked".
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batch import IGNORE

try:  # optional, CUDA-only
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except ImportError:
    liger_fused_linear_cross_entropy = None

IMPLS = ("auto", "chunked", "liger", "materialized")
# Rows per chunk. Each chunk streams the whole weight through its matmuls, so small chunks pay that again and again:
# on CPU, 256-row text chunks ran 1.1-1.2× the materialized time, 512 and 1024 rows 0.93-1.03× (benchmarks/
# RESULTS.md). One fp32 chunk of the 128256-way text head is then 250 MiB.
DEFAULT_CHUNK_TOKENS = 512


class HeadLoss(NamedTuple):
    """A NamedTuple (not a dataclass) so DeepSpeed ZeRO-3 sees its tensors and re-gathers the weight for backward."""

    loss_sum: torch.Tensor  # fp32 [num_heads]: summed token CE over non-ignored targets (differentiable)
    count: torch.Tensor  # long [num_heads]: non-ignored targets per head
    predictions: torch.Tensor | None  # long [N, num_heads]: argmax per row, when asked for


def fused_kernels_apply(device: torch.device) -> bool:
    """Where the Triton kernels (Liger's fused CE, RMSNorm, SwiGLU) may run. The one dispatch predicate of the
    model: tests/test_gpu_standins.py lifts it to run the kernel paths on the CPU with pure-PyTorch stand-ins."""
    return device.type == "cuda"


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation that actually runs for `impl` on `device`."""
    if impl in ("auto", "liger"):
        return "liger" if liger_fused_linear_cross_entropy is not None and fused_kernels_apply(device) else "chunked"
    return impl


def _chunk_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    grad_scale: torch.Tensor | None,
    grad_weight: torch.Tensor | None,
    want_grad_hidden: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Loss sum [heads] and argmax [rows, heads] of one chunk. With `grad_scale` [heads], also d(Σ_k scale_k·loss_k):
    added into `grad_weight` (fp32) and returned for the chunk's hidden rows when `want_grad_hidden`."""
    rows, heads = targets.shape
    logits = (hidden @ weight.T).float().view(rows, heads, -1)
    row_max, predictions = logits.max(dim=-1)
    valid = targets != IGNORE
    safe_targets = torch.where(valid, targets, 0).unsqueeze(-1)
    target_logit = logits.gather(-1, safe_targets).squeeze(-1)
    exp_logits = logits.sub_(row_max.unsqueeze(-1)).exp_()  # in place: the chunk's only [rows, heads*V] buffer
    sum_exp = exp_logits.sum(dim=-1)
    loss = torch.where(valid, row_max + sum_exp.log() - target_logit, 0.0).sum(dim=0)
    if grad_scale is None:
        return loss, predictions, None

    # d loss/d logits = softmax − onehot on valid rows (ignored rows get 0), times the head's scale.
    scale = valid * grad_scale
    grad_logits = exp_logits.mul_((scale / sum_exp).unsqueeze(-1))
    grad_logits.scatter_add_(-1, safe_targets, -scale.unsqueeze(-1))
    grad_logits = grad_logits.view(rows, -1)
    if grad_weight is not None:
        grad_weight.addmm_(grad_logits.T, hidden.float())
    grad_hidden = grad_logits.to(weight.dtype) @ weight if want_grad_hidden else None
    return loss, predictions, grad_hidden


def _chunked_pass(hidden, weight, targets, chunk_tokens, grad_scale, want_grad_hidden, want_grad_weight):
    """Runs `_chunk_step` over all rows; returns (loss_sum, predictions, grad_hidden, grad_weight)."""
    num_rows, heads = targets.shape
    loss_sum = torch.zeros(heads, dtype=torch.float32, device=hidden.device)
    predictions = torch.empty(num_rows, heads, dtype=torch.long, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_grad_hidden else None
    # fp32 accumulator; zeros even when num_rows == 0 so the weight still gets its (zero) grad.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad_weight else None
    for start in range(0, num_rows, chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        loss, predictions[rows], grad_rows = _chunk_step(
            hidden[rows], weight, targets[rows], grad_scale, grad_weight, want_grad_hidden
        )
        loss_sum += loss
        if grad_rows is not None:
            grad_hidden[rows] = grad_rows
    return loss_sum, predictions, grad_hidden, grad_weight


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [heads*V, H], targets [N, heads]) -> (loss_sum [heads], predictions [N, heads]).

    Gradients are computed in forward for unit scales and scaled by grad_output in backward. grad_weight scales per
    head block, exactly. grad_hidden sums over heads, so it scales exactly only for one head (the text head: three
    matmuls per chunk, as in the materialized path). With several heads (the audio head; per-codebook normalisers
    make their grad_outputs differ) backward computes grad_hidden with the per-head scales (two matmuls per chunk,
    on a small head): deciding at run time whether the scales agree would be a host sync."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens: int, grad_enabled: bool):
        want_hidden, want_weight = (grad_enabled and need for need in ctx.needs_input_grad[:2])
        multi_head = targets.shape[1] > 1
        unit = torch.ones(targets.shape[1], device=hidden.device) if want_hidden or want_weight else None
        loss_sum, predictions, ctx.grad_hidden, ctx.grad_weight = _chunked_pass(
            hidden, weight, targets, chunk_tokens, unit, want_hidden and not multi_head, want_weight
        )
        ctx.grads_ready, ctx.chunk_tokens, ctx.weight_dtype = unit is not None, chunk_tokens, weight.dtype
        ctx.recompute_hidden = want_hidden and multi_head
        if ctx.recompute_hidden:
            ctx.save_for_backward(hidden, weight, targets)
        ctx.mark_non_differentiable(predictions)
        return loss_sum, predictions

    @staticmethod
    def backward(ctx, grad_loss, _grad_predictions):
        if not ctx.grads_ready:
            raise RuntimeError("LinearCrossEntropyHead: backward through the same forward twice is not supported")
        # Take the forward-time buffers (scaled in place below) so the graph does not keep them alive.
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        ctx.grads_ready = False
        heads = grad_loss.shape[0]
        if grad_weight is not None:
            grad_weight.view(heads, -1).mul_(grad_loss.view(heads, 1))
            grad_weight = grad_weight.to(ctx.weight_dtype)
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss[0])
        elif ctx.recompute_hidden:
            hidden, weight, targets = ctx.saved_tensors
            _, _, grad_hidden, _ = _chunked_pass(hidden, weight, targets, ctx.chunk_tokens, grad_loss.float(), True,
                                                 False)
        return grad_hidden, grad_weight, None, None, None


class LinearCrossEntropyHead(nn.Module):
    """A bias-free linear head (weight [num_heads*vocab_size, hidden_size]) that owns its weight, so ZeRO-3 gathers it
    around forward. forward(hidden) -> logits [..., num_heads*vocab_size]; forward(hidden, targets) -> HeadLoss
    without ever holding all logits (unless impl="materialized")."""

    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int = 1,
        chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"LinearCrossEntropyHead: impl must be one of {IMPLS}, got {impl!r}")
        if chunk_tokens < 1:
            raise ValueError(f"LinearCrossEntropyHead: chunk_tokens must be >= 1, got {chunk_tokens}")
        self.hidden_size, self.vocab_size, self.num_heads = hidden_size, vocab_size, num_heads
        self.chunk_tokens, self.impl = chunk_tokens, impl
        self.weight = nn.Parameter(torch.empty(num_heads * vocab_size, hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Linear

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, vocab_size={self.vocab_size}, num_heads={self.num_heads}, "
            f"chunk_tokens={self.chunk_tokens}, impl={self.impl!r}"
        )

    def forward(
        self, hidden: torch.Tensor, targets: torch.Tensor | None = None, return_predictions: bool = False
    ) -> torch.Tensor | HeadLoss:
        """hidden [N, H]; targets long [N] (num_heads == 1) or [N, num_heads], -100 = ignored."""
        if targets is None:
            return F.linear(hidden, self.weight)
        targets = self._check(hidden, targets)
        count = (targets != IGNORE).sum(dim=0)
        impl = resolve_impl(self.impl, hidden.device)
        if impl == "liger" and (return_predictions or hidden.shape[0] == 0):
            impl = "chunked"
        if impl == "materialized":
            loss_sum, predictions = self._materialized(hidden, targets)
        elif impl == "liger":
            loss_sum, predictions = self._liger(hidden, targets), None
        else:
            loss_sum, predictions = _FusedLinearCrossEntropy.apply(
                hidden, self.weight, targets, self.chunk_tokens, torch.is_grad_enabled()
            )
        return HeadLoss(loss_sum, count, predictions if return_predictions else None)

    def _check(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Validates shapes and dtypes; returns targets as [N, num_heads]."""
        name = f"LinearCrossEntropyHead(vocab_size={self.vocab_size}, num_heads={self.num_heads})"
        if hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"{name}: hidden must be [N, {self.hidden_size}], got {list(hidden.shape)}")
        if hidden.dtype != self.weight.dtype:
            raise ValueError(f"{name}: hidden dtype {hidden.dtype} != weight dtype {self.weight.dtype}")
        num_rows = hidden.shape[0]
        expected = [(num_rows,), (num_rows, 1)] if self.num_heads == 1 else [(num_rows, self.num_heads)]
        if targets.dtype != torch.long or tuple(targets.shape) not in expected:
            raise ValueError(
                f"{name}: targets must be torch.long of shape {' or '.join(map(str, expected))}, "
                f"got {targets.dtype} {tuple(targets.shape)}"
            )
        # Ranges are not checked here (that would sync with the device): Batch.validate does it on the CPU.
        return targets.view(num_rows, self.num_heads)

    def _materialized(self, hidden, targets):
        # Matmul in the input dtype, loss in fp32: the same numerics as a chunk, without an fp32 copy of the weight.
        logits = (hidden @ self.weight.T).float().view(hidden.shape[0], self.num_heads, self.vocab_size)
        loss_sum = torch.stack(
            [
                F.cross_entropy(logits[:, k], targets[:, k], ignore_index=IGNORE, reduction="sum")
                for k in range(self.num_heads)
            ]
        )
        return loss_sum, logits.argmax(dim=-1)

    def _liger(self, hidden, targets):
        vocab = self.vocab_size
        return torch.stack(
            [
                liger_fused_linear_cross_entropy(
                    hidden, self.weight[k * vocab : (k + 1) * vocab], targets[:, k].contiguous(),
                    ignore_index=IGNORE, reduction="sum",
                ).float()
                for k in range(self.num_heads)
            ]
        )
