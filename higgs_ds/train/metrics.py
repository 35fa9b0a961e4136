"""A step's numbers: the one all-reduce of its loss sums, token counts, model FLOPs and the stream's counters, the
metrics dict the hooks and metrics.jsonl receive, and the progress line. Losses, counts and FLOPs are all-reduced;
time/* and memory/* are rank 0's own."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.shards import atomic_write
from ..data.stream import COUNTERS
from ..model.losses import LossConfig, LossSums


def all_reduce_sum(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Sum over every rank (one collective), on the host."""
    import torch.distributed as dist

    values = values.to(device)
    dist.all_reduce(values)
    return values.cpu()


@dataclass
class StepTotals:
    """What one step adds up on each rank; `all_reduce` sums it over ranks in one collective."""

    losses: LossSums
    tokens: float = 0.0  # real positions of the collated batches (text tokens and audio frames; no padding)
    samples: float = 0.0
    counters: dict[str, int] | None = None  # the stream's (data/*), since the run started
    flops: float = 0.0  # model FLOPs of the step's micro-batches (flops.ModelFlops)

    def all_reduce(self, device: torch.device) -> "StepTotals":
        counters = self.counters or {}
        extra = [self.tokens, self.samples, self.flops, *(counters.get(c, 0) for c in COUNTERS)]
        vector = torch.cat([self.losses.vector.to(device), torch.tensor(extra, dtype=torch.float64, device=device)])
        reduced = all_reduce_sum(vector, device)
        n = self.losses.vector.numel()
        return StepTotals(LossSums(reduced[:n]), float(reduced[n]), float(reduced[n + 1]),
                          {c: int(v) for c, v in zip(COUNTERS, reduced[n + 3:].tolist())}, float(reduced[n + 2]))


class StepTimer:
    """Step time, data-wait share and ETA from the mean step time of this process's steps so far (the first
    includes warm-up)."""

    def __init__(self):
        self.seconds: list[float] = []

    def metrics(self, seconds: float, data_seconds: float, steps_left: int) -> dict[str, float]:
        self.seconds.append(seconds)
        mean = sum(self.seconds) / len(self.seconds)
        return {"time/step_s": seconds, "time/data_wait_share": data_seconds / seconds,
                "time/eta_s": mean * max(0, steps_left)}


def step_metrics(totals: StepTotals, loss_config: LossConfig, seconds: float, world: int = 1,
                 peak_tflops: float | None = None) -> dict[str, float]:
    """Losses (the objective's own reduction), token counts and throughput of an all-reduced step: tokens/s of all
    ranks and per rank (their mean), the model TFLOP/s per rank and, with the device's peak (TFLOPS per rank),
    `throughput/mfu` = the step's model FLOPs of every rank / (seconds × world × peak)."""
    losses = totals.losses
    k = losses.num_codebooks
    text_tokens, audio_tokens = float(losses.text_count), float(losses.audio_counts.sum())
    learnable_positions = text_tokens + audio_tokens / k  # audio: K labels per frame
    tflops_per_rank = totals.flops / seconds / world / 1e12
    metrics = {**losses.means(loss_config),
               "tokens/total": totals.tokens,
               "tokens/learnable_share": learnable_positions / max(1.0, totals.tokens),
               "tokens/text_learnable": text_tokens, "tokens/audio_learnable": audio_tokens,
               "throughput/tokens_per_s": totals.tokens / seconds,
               "throughput/tokens_per_s_per_rank": totals.tokens / seconds / world,
               "throughput/samples_per_s": totals.samples / seconds,
               "throughput/model_tflops_per_rank": tflops_per_rank}
    if peak_tflops is not None:
        metrics["throughput/mfu"] = tflops_per_rank / peak_tflops
    return metrics


def peak_rss_gib() -> float:
    """This process's peak resident memory (on a GPU, `torch.cuda.max_memory_allocated` tells the device's)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def step_line(step: int, total_steps: int, m: dict[str, float]) -> str:
    eta = int(m["time/eta_s"])
    return (f"step {step}/{total_steps} loss {m['loss/total']:.4f} text {m['loss/text']:.4f} "
            f"audio {m['loss/audio']:.4f} lr {m['lr']:.3g} grad_norm {m['grad_norm']:.3f} "
            f"tok/s {m['throughput/tokens_per_s']:.0f} "
            + (f"mfu {m['throughput/mfu']:.1%} " if "throughput/mfu" in m else "")
            + f"data {m['time/data_wait_share']:.0%} "
            f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


class MetricsLog:
    """OUT/metrics.jsonl, one row per step (rank 0). A resumed run first drops the rows after the step it resumes
    at (an interrupted run logged them before its last checkpoint was superseded), so no step appears twice."""

    def __init__(self, out_dir: str | Path, start_step: int):
        self.path, self.failed = Path(out_dir) / "metrics.jsonl", False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            rows = self.path.read_text().splitlines(keepends=True)
            kept = [row for row in rows if _step_of(row) is not None and _step_of(row) <= start_step]
            if len(kept) != len(rows):
                atomic_write(self.path, "".join(kept).encode())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        try:
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as exc:  # a full disk: the next save stops every rank with its line; the step goes on
            if not self.failed:
                print(f"warning: cannot append to {self.path}: {exc}", file=sys.stderr, flush=True)
            self.failed = True


def _step_of(row: str) -> int | None:
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a torn last line of a killed run
