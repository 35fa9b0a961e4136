"""Loss assembly: next-token shift, learnable-position selection and normalisation (docs/design.md §5).

Shift. Labels in a Batch are unshifted. Hidden state t predicts the label at t+1 **within the same segment**
(packed sample), so the last position of a sample never sees the next sample's first label, and nothing predicts
into padding (segment 0).
  text:  rows t whose shifted text label is not -100 go to the text head.
  audio: rows at audio-out frame j whose next position is audio-out frame j+1 of the same segment and whose label
         column j+1 has any code != -100 go to the audio head, with per-codebook targets (-100 elsewhere).

Objective.
  loss = grad_scale * (text_weight * text_sum / N_text + audio_weight * R_k(audio_sum_k / N_audio_k))
with R = sum or mean over codebooks (`LossConfig.audio_reduction`; the transformers port sums). The normalisers N:
  * `loss_norm=None`: this batch's own learnable counts and grad_scale = 1 (a per-batch mean, e.g. evaluation).
  * `loss_norm=LossNorm(...)`: the engine passes the GLOBAL counts of the optimizer step and
    grad_scale = world_size * grad_accum_steps. Global counts: `learnable_counts(batch)` of each of the step's
    micro-batches, summed, then all-reduced (sum) over ranks, before the step's first forward. DeepSpeed averages
    gradients over ranks and divides by the accumulation steps; the scale undoes both, so the step's gradient equals
    the single-process gradient of the full-batch mean (tests/test_losses.py checks this).
A normaliser of 0 (no such tokens anywhere) counts as 1: that term is then 0 and still carries a (zero) gradient.

Logging. `loss_means` turns sums and counts into the logged means with the same reduction as the objective:
`loss/text`, `loss/audio` (exactly the audio term used: sum or mean over codebooks), `loss/audio_cb{k}`, `loss/total`.
Feed it all-reduced sums/counts (`LossSums`) to log global means; the model reports this batch's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch

from ..data.batch import IGNORE, Batch, BatchIndex

@dataclass(frozen=True)
class LossConfig:
    text_weight: float = 1.0
    audio_weight: float = 1.0
    audio_reduction: Literal["sum", "mean"] = "sum"

    def __post_init__(self):
        if self.audio_reduction not in ("sum", "mean"):
            raise ValueError(f"LossConfig.audio_reduction must be 'sum' or 'mean', got {self.audio_reduction!r}")


@dataclass
class LossNorm:
    """Global normalisers for one optimizer step; see the module docstring."""

    text_tokens: float
    audio_tokens: torch.Tensor | float  # [K] per codebook, or one count for all codebooks
    grad_scale: float = 1.0


class Targets(NamedTuple):
    """The heads' targets, gathered at BatchIndex's target positions (the shift: the label one position on)."""

    text: torch.Tensor  # long [n_text]
    audio: torch.Tensor  # long [n_audio, K]


@dataclass
class LearnableCounts:
    text: torch.Tensor  # long scalar
    audio: torch.Tensor  # long [K]


def next_token_targets(label_ids: torch.Tensor, audio_out_labels: torch.Tensor, index: BatchIndex) -> Targets:
    """Gathers only (no data-dependent shapes): the positions were chosen by `index_batch` on the CPU; the target of
    position t is the label at t + 1."""
    return Targets(text=label_ids.flatten()[index.text_target_positions + 1],
                   audio=audio_out_labels[:, index.audio_target_frames + 1].T)


def learnable_counts(batch: Batch) -> LearnableCounts:
    """Tokens each head learns from in `batch`: sum these over ranks and micro-batches to build a LossNorm."""
    targets = next_token_targets(batch.label_ids, batch.audio_out_labels, batch.index)
    return LearnableCounts(text=(targets.text != IGNORE).sum(), audio=(targets.audio != IGNORE).sum(dim=0))


def reduce_codebooks(per_codebook: torch.Tensor, reduction: str) -> torch.Tensor:
    return per_codebook.sum() if reduction == "sum" else per_codebook.mean()


def uniform_audio_loss(ids_per_codebook: int, num_codebooks: int, reduction: str) -> float:
    """The audio term of a model that predicts every id of every codebook alike (ln(ids) per codebook)."""
    return float(reduce_codebooks(torch.full((num_codebooks,), math.log(ids_per_codebook)), reduction))


def _terms(text_loss_sum, text_norm, audio_loss_sum, audio_norm, config: LossConfig):
    """(text mean, per-codebook means, audio term, weighted total); a normaliser of 0 counts as 1."""
    text = text_loss_sum / text_norm.to(text_loss_sum).clamp_min(1)
    per_codebook = audio_loss_sum / audio_norm.to(audio_loss_sum).clamp_min(1)
    audio = reduce_codebooks(per_codebook, config.audio_reduction)
    return text, per_codebook, audio, config.text_weight * text + config.audio_weight * audio


def objective(text_loss_sum: torch.Tensor, text_tokens: torch.Tensor, audio_loss_sum: torch.Tensor,
              audio_tokens: torch.Tensor, config: LossConfig, norm: LossNorm | None = None) -> torch.Tensor:
    """The scalar to backpropagate. Sums are differentiable fp32; counts are this batch's (used when norm is None)."""
    if norm is None:
        text_norm, audio_norm, scale = text_tokens, audio_tokens, 1.0
    else:
        text_norm, scale = torch.as_tensor(norm.text_tokens), norm.grad_scale
        audio_norm = torch.as_tensor(norm.audio_tokens).expand(audio_loss_sum.shape)
    return scale * _terms(text_loss_sum, text_norm, audio_loss_sum, audio_norm, config)[3]


@dataclass
class LossSums:
    """Loss sums and learnable counts as one float64 vector [text sum, text count, audio sums (K), audio counts (K)]
    on the sums' device: add it up over micro-batches and batches, all-reduce `.vector` once, read `.means`."""

    vector: torch.Tensor

    @classmethod
    def zeros(cls, num_codebooks: int, device=None) -> "LossSums":
        return cls(torch.zeros(2 + 2 * num_codebooks, dtype=torch.float64, device=device))

    @classmethod
    def of(cls, text_loss_sum: torch.Tensor, text_tokens: torch.Tensor, audio_loss_sum: torch.Tensor,
           audio_tokens: torch.Tensor) -> "LossSums":
        return cls(torch.cat([text_loss_sum.reshape(1).double(), text_tokens.reshape(1).double(),
                              audio_loss_sum.double(), audio_tokens.double()]))

    @property
    def num_codebooks(self) -> int:
        return (self.vector.numel() - 2) // 2

    @property
    def text_count(self) -> torch.Tensor:
        return self.vector[1]

    @property
    def audio_counts(self) -> torch.Tensor:
        return self.vector[2 + self.num_codebooks:]

    def __add__(self, other: "LossSums") -> "LossSums":
        return LossSums(self.vector + other.vector)

    def means(self, config: LossConfig) -> dict[str, float]:
        """`loss_means` of these sums, as floats."""
        k, v = self.num_codebooks, self.vector
        return {name: float(value) for name, value in loss_means(v[0], v[1], v[2:2 + k], v[2 + k:], config).items()}


def loss_means(text_loss_sum: torch.Tensor, text_tokens: torch.Tensor, audio_loss_sum: torch.Tensor,
               audio_tokens: torch.Tensor, config: LossConfig) -> dict[str, torch.Tensor]:
    """Logged means (detached fp32), with the objective's own reduction; a term with no tokens logs 0."""
    text, per_codebook, audio, total = _terms(text_loss_sum.detach().float(), text_tokens,
                                              audio_loss_sum.detach().float(), audio_tokens, config)
    means = {"loss/text": text, "loss/audio": audio, "loss/total": total}
    means.update({f"loss/audio_cb{k}": value for k, value in enumerate(per_codebook)})
    return means
