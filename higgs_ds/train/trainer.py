"""The step loop (docs/design.md §5 and §8).

One optimizer step: take the step's `grad_accum` micro-batches first, sum their learnable counts and all-reduce
them, then run each forward with that global `LossNorm` (grad_scale = world × accumulation undoes DeepSpeed's mean
over ranks and micro-batches), so the step's gradient is the single-process gradient of the whole step's data.
Losses, token counts and the stream's counters are all-reduced in one collective (metrics.StepTotals); rank 0 logs
them and hands them to the hooks, and a hook's stop request reaches every rank through a broadcast flag."""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

from ..data.batch import Batch
from ..hooks.base import Hooks, StepReport, StopRequest, step_predictions
from ..model import LossNorm, learnable_counts
from ..model.losses import LossSums
from . import checkpointing
from .config import fingerprint
from .engine import build_engine, build_model, set_schedule
from .flops import ModelFlops, Work, peak_tflops
from .loaders import make_loader, steps_left
from .metrics import MetricsLog, StepTimer, StepTotals, all_reduce_sum, peak_rss_gib, step_line, step_metrics
from .preflight import Setup

log = logging.getLogger("higgs_ds.train")


class TrainingStopped(RuntimeError):
    """The run stopped with an error, on every rank at the same step; the message (one line) says why."""


class Trainer:
    def __init__(self, setup: Setup, hooks: Hooks | None = None):
        import torch.distributed as dist

        self.setup, self.config, self.hooks = setup, setup.config, hooks or Hooks([])
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.num_codebooks = setup.model_config.audio.num_codebooks
        model, trainable = build_model(setup, self.rank)
        d, t = self.config.data, self.config.train
        self.loader = make_loader(self.config, setup.collator(), d.train, self.rank, self.world, train=True)
        self.val_loader = (make_loader(self.config, setup.collator(), d.val, self.rank, self.world, train=False)
                           if d.val else None)
        self.total_steps = steps_left(self.config, self.loader)
        self.saved = checkpointing.load_client(setup.resume_from) if setup.resume_from is not None else None
        self.parts = build_engine(setup, model, trainable, self.total_steps,
                                  saved_world=self.saved["world_size"] if self.saved else self.world)
        self.engine, self.device = self.parts.engine, self.parts.device
        # Model FLOPs per micro-batch (what trains decides the backward's matmuls) and this rank's device peak: on the
        # CPU measured now, on every rank at once (deepspeed.initialize's collectives just lined them up).
        self.model_flops = ModelFlops.of(self.engine.module)
        self.peak_tflops, peak_source = peak_tflops(self.device, t.peak_tflops)
        if self.rank == 0:
            if self.peak_tflops is None:
                log.info("no throughput/mfu: %s; set train.peak_tflops (TFLOPS per rank) for it", peak_source)
            else:
                log.info("throughput/mfu against a peak of %.3g TFLOPS per rank (%s)", self.peak_tflops, peak_source)
        # Runtime randomness (dropout): a seed per rank, so ranks draw different masks; the weights' init used
        # model.init_seed on every rank alike. torch.manual_seed seeds the accelerators' generators too.
        torch.manual_seed(t.seed + self.rank)
        self.out = Path(t.out_dir)
        self.step = self.skipped_in_a_row = self.skipped_total = 0
        self.last_checkpoint = setup.resume_from
        self.timer = StepTimer()
        self.trace, self.tracing = None, t.trace_samples
        self.metrics_log: MetricsLog | None = None

    # ------------------------------------------------------------------------------------------ checkpoints

    def save(self) -> Path:
        state = {"stream": self.loader.state_dict(), **checkpointing.rng_state(self.device)}
        client = {"step": self.step, "fingerprint": fingerprint(self.config), "world_size": self.world,
                  "schedule_steps": self.parts.schedule.last_epoch, "skipped_steps": self.skipped_total,
                  "skipped_in_a_row": self.skipped_in_a_row}
        self.last_checkpoint = checkpointing.save(
            self.engine, self.out / "checkpoints", self.step, state, client, self.rank, self.config.train.keep_last,
            adapters_only=bool(self.config.lora.rank))
        return self.last_checkpoint

    def resume(self) -> None:
        """Continue from the preflight's tag: exactly at the same world size; at another one through DeepSpeed's
        universal checkpoint with the stream re-planned over the samples not yet consumed. The schedule goes where
        the applied (not skipped) steps left it."""
        path, client = self.setup.resume_from, self.saved
        if path is not None:
            saved_world = client["world_size"]
            states = [checkpointing.load_rank_state(path, r) for r in range(saved_world)]
            checkpointing.load_engine_state(self.engine, self.parts.optimizer, path, self.out, saved_world,
                                            self.rank, strict=not self.config.lora.rank)
            self.step = int(client["step"])
            self.skipped_total = int(client.get("skipped_steps", 0))
            self.skipped_in_a_row = int(client.get("skipped_in_a_row", 0))
            own = states[min(self.rank, saved_world - 1)]
            self.loader.load_state_dict(own["stream"], [s["stream"] for s in states])
            if saved_world != self.world:  # the rest of the data makes another number of steps now
                self.total_steps = steps_left(self.config, self.loader, self.step)
            # The schedule's horizon is this run's (train.max_steps / epochs may have changed; loading the scheduler
            # state put the saved one back), its position the applied steps'.
            set_schedule(self.parts, int(client.get("schedule_steps", self.step)), self.total_steps)
            if self.rank < saved_world:
                checkpointing.set_rng_state(states[self.rank], self.device)
            if self.rank == 0:
                log.info("resumed from %s at step %d%s", path, self.step, "" if saved_world == self.world else
                         f" (saved on {saved_world} ranks, running on {self.world}: universal checkpoint, the "
                         "epoch's remaining samples re-planned)")
        if self.rank == 0:
            moved, removed = checkpointing.set_aside_newer(self.out / "checkpoints", self.step)
            if moved:
                print(f"warning: checkpoints after step {self.step} are not this run's future and were renamed "
                      f"*.set-aside in {self.out / 'checkpoints'}: {', '.join(moved)}", file=sys.stderr, flush=True)
            if removed:
                log.info("removed unfinished checkpoint saves after step %d: %s", self.step, ", ".join(removed))
            self.metrics_log = MetricsLog(self.out, self.step)
            self.hooks.on_start(self.step)

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Take the step's micro-batches, normalise by the global counts, step, report, evaluate, save."""
        t = self.config.train
        stream = self._micro_batches()
        metrics: dict[str, float] = {}
        self.engine.train()
        while self.step < self.total_steps:
            started = time.perf_counter()
            micro = [batch for batch in (next(stream, None) for _ in range(t.grad_accum)) if batch is not None]
            if not micro:  # the data ran out before the planned steps (every rank alike: equal batch counts)
                log.warning("rank %d: the data ended after step %d of %d", self.rank, self.step, self.total_steps)
                self.total_steps = self.step
                if self.step:
                    self.save()
                break
            metrics, stop = self._step(micro, started, data_seconds=time.perf_counter() - started)
            last = self.step == self.total_steps or stop is not None
            if self.val_loader is not None and ((t.eval_every and self.step % t.eval_every == 0) or last):
                self.evaluate()
            if (t.save_every and self.step % t.save_every == 0) or last:
                self.save()
            if stop is not None and stop.failed:
                raise TrainingStopped(stop.reason)
            if last:
                break
        return metrics

    def _micro_batches(self) -> Iterator[Batch]:
        while self.loader.epoch < self.config.train.epochs:
            yield from self.loader

    def _step(self, micro: list[Batch], started: float, data_seconds: float):
        everyone, norm = self._global_norm(micro)
        skipped_before = self.engine.skipped_steps
        totals, predictions = self._micro_steps(micro, norm)
        self.step += 1
        # ZeRO (0.19.8) drops a step whose global gradient norm is not finite, on every rank alike (the norm is
        # global), and does not advance the schedule; we count it and stop after too many in a row.
        skipped = self.engine.skipped_steps > skipped_before
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        self.skipped_total += int(skipped)
        counters = self.loader.stats()
        totals.counters = counters
        reduced = totals.all_reduce(self.device)  # data/* are the whole run's, every rank's
        metrics = self._metrics(reduced, time.perf_counter() - started, data_seconds, skipped)
        stop = None
        if self.rank == 0:
            stop = self._report(metrics, everyone, predictions, skipped, {**counters, **reduced.counters})
        if self.skipped_in_a_row >= self.config.train.max_skipped_steps:  # every rank alike: the norm is global
            raise TrainingStopped(f"stopping at step {self.step}: {self.skipped_in_a_row} steps in a row had a "
                                  "non-finite loss or gradient and were skipped (train.max_skipped_steps="
                                  f"{self.config.train.max_skipped_steps}); the newest checkpoint holds the last "
                                  "good weights")
        return metrics, self._broadcast_stop(stop)

    def _global_norm(self, micro: list[Batch]) -> tuple[torch.Tensor, LossNorm]:
        """Every rank's learnable counts of this step ([world, 1 + K], all-reduced) and the step's LossNorm."""
        counts = [learnable_counts(b) for b in micro]
        everyone = torch.zeros(self.world, self.num_codebooks + 1, dtype=torch.long)
        everyone[self.rank] = torch.stack([torch.cat([c.text.reshape(1), c.audio]) for c in counts]).sum(0)
        everyone = all_reduce_sum(everyone, self.device)
        total = everyone.sum(0)
        norm = LossNorm(text_tokens=float(total[0]), audio_tokens=total[1:].double(),
                        grad_scale=float(self.world * self.config.train.grad_accum))
        return everyone, norm

    def _micro_steps(self, micro: list[Batch], norm: LossNorm) -> tuple[StepTotals, dict | None]:
        """Forward, backward and engine.step of each micro-batch; this rank's loss sums and counts, and rank 0's
        predictions of the last micro-batch when the hooks want them."""
        totals, predictions = StepTotals(LossSums.zeros(self.num_codebooks, self.device)), None
        for n, batch in enumerate(micro):
            last = n == len(micro) - 1
            if last and len(micro) < self.config.train.grad_accum:
                # The run's last, partial step (the data's last micro-batches): step the optimizer here. The
                # global LossNorm already normalises by this step's counts; grad_scale stays world × accum
                # because DeepSpeed still divides by its configured accumulation.
                self.engine.set_gradient_accumulation_boundary(True)
            want = last and self.rank == 0 and bool(self.hooks) and self._wants_predictions()
            result = self._forward(batch, norm, want)
            self.engine.backward(result.loss)
            self.engine.step()
            totals.losses = totals.losses + result.sums()  # on the device: no host sync per micro-batch
            totals.tokens += batch.num_tokens
            totals.flops += self.model_flops(Work.of(batch))
            totals.samples += len(batch.sample_keys)
            self._trace(n, batch)
            if want:
                predictions = step_predictions(result, batch, self.setup.model_config.audio)
        return totals, predictions

    def _forward(self, batch: Batch, norm: LossNorm | None, want_predictions: bool = False):
        return self.engine(**batch.to(self.device).model_inputs(), loss_norm=norm,
                           return_predictions=want_predictions)

    def _wants_predictions(self) -> bool:
        """Predictions (top-1 at every learnable row) on the first step and at the slice and guard cadences only: on a
        GPU asking for them runs the chunked head instead of Liger's."""
        step = self.step + 1
        every = [e for e in (self.config.train.slice_every, self.config.guards.check_every) if e]
        return step == 1 or any(step % e == 0 for e in every)

    def _trace(self, micro: int, batch: Batch) -> None:
        if not self.tracing:
            return
        try:
            if self.trace is None:
                (self.out / "trace").mkdir(parents=True, exist_ok=True)
                self.trace = open(self.out / "trace" / f"rank{self.rank}.jsonl", "a")
            self.trace.write(json.dumps({"step": self.step + 1, "micro": micro, "keys": batch.sample_keys}) + "\n")
            self.trace.flush()
        except OSError as exc:  # a full disk: the next save stops every rank with its line; this rank goes on
            print(f"warning: rank {self.rank} stops tracing samples: {exc}", file=sys.stderr, flush=True)
            self.tracing = False

    def _metrics(self, totals: StepTotals, seconds: float, data_seconds: float, skipped: bool) -> dict[str, float]:
        metrics = step_metrics(totals, self.engine.module.loss_config, seconds, self.world, self.peak_tflops)
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update({"memory/peak_rss_gib": peak_rss_gib(), "lr": float(self.parts.schedule.get_last_lr()[0]),
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        **self.timer.metrics(seconds, data_seconds, self.total_steps - self.step)})
        if self.device.type == "cuda":
            metrics["memory/peak_gpu_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        metrics.update({"train/step_skipped": float(skipped), "train/skipped_steps": float(self.skipped_total)})
        return metrics

    def _report(self, metrics: dict, everyone: torch.Tensor, predictions: dict | None, skipped: bool,
                stream: dict[str, int]) -> StopRequest | None:
        """Rank 0: the step line, metrics.jsonl, the hooks; their stop request."""
        report = StepReport(self.step, self.total_steps, metrics, everyone.tolist(), predictions, stream)
        if skipped:
            report.alarms.append(f"step {self.step} skipped: non-finite loss or gradient (loss "
                                 f"{metrics['loss/total']}); {self.skipped_in_a_row} in a row")
            log.warning(report.alarms[-1])
        if self.step % self.config.train.log_every == 0 or self.step == self.total_steps:
            print(step_line(self.step, self.total_steps, metrics), flush=True)
        stop = self.hooks.on_step(report)  # adds time/hooks_s, this step's
        self.metrics_log.write(self.step, metrics)
        return stop

    def _broadcast_stop(self, stop: StopRequest | None) -> StopRequest | None:
        """Rank 0's stop request on every rank (0 go on, 1 stop, 2 stop with an error); the reason is rank 0's."""
        import torch.distributed as dist

        flag = torch.tensor([0 if stop is None else 2 if stop.failed else 1], device=self.device)
        dist.broadcast(flag, src=0)
        code = int(flag.item())
        if stop is None and code:
            stop = StopRequest("stopped by a hook on rank 0 (its message says why)", failed=code == 2)
        return stop

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.engine.eval()
        self.val_loader.set_epoch(0)
        sums = LossSums.zeros(self.num_codebooks, self.device)
        for batch in self.val_loader:
            sums = sums + self._forward(batch, None).sums()
        means = LossSums(all_reduce_sum(sums.vector, self.device)).means(self.engine.module.loss_config)
        self.engine.train()
        metrics = {f"eval/{name.split('/', 1)[1]}": value for name, value in means.items()}
        if self.rank == 0:
            print(f"eval step {self.step}: " + " ".join(f"{n} {v:.4f}" for n, v in metrics.items()
                                                          if "_cb" not in n), flush=True)
            self.hooks.on_eval(self.step, metrics)
        return metrics

    def close(self) -> None:
        if self.trace is not None:
            self.trace.close()
