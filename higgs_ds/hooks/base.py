"""The seam between the engine and rank 0's hooks: what a hook receives after each step (`StepReport`), what it may
answer (`StopRequest`), and `Hooks`, which calls them so that a failing hook is switched off with one error line
instead of taking every rank down."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class StepReport:
    """What rank 0's hooks receive after each optimizer step. Values are all-reduced over ranks."""

    step: int
    total_steps: int
    metrics: dict[str, float]  # loss/..., lr, grad_norm, throughput/..., counts
    rank_learnable: list[list[int]]  # per rank: [text, audio codebook 0..K-1] learnable tokens this step
    predictions: dict[str, Any] | None = None  # rank 0's last micro-batch: step_predictions
    stream: dict[str, int] = field(default_factory=dict)  # the stream's counters summed over ranks; epoch, position
    # This step's alarms, one line each: a skipped step (the trainer), a guard's alarm, a hook switched off (the
    # runner). Hooks append to it; the ones after them (TensorBoard runs last) record them.
    alarms: list[str] = field(default_factory=list)


PREDICTED = ("text_predictions", "text_labels", "text_positions", "audio_predictions", "audio_labels",
             "audio_frames", "audio_inputs")


def step_predictions(result, batch, audio) -> dict[str, Any]:
    """`StepReport.predictions`, from a forward with return_predictions (`result`, a HiggsAudioOutput) on `batch` (on
    the CPU): the top-1 predictions beside their labels at every learnable row, on the CPU; which sample and position
    each row belongs to and the batch's inputs to decode them; the audio stream's settings `audio` (stream bos/eos
    ids, the delay pattern) to read the audio rows (hooks/slices.py)."""
    predictions = {key: getattr(result, key).cpu() for key in PREDICTED}
    predictions.update(sample_keys=list(batch.sample_keys), input_ids=batch.input_ids, label_ids=batch.label_ids,
                       segment_ids=batch.segment_ids, position_ids=batch.position_ids,
                       audio_out_mask=batch.audio_out_mask, audio_settings=audio)
    return predictions


@dataclass(frozen=True)
class StopRequest:
    """A hook asks every rank to stop after this step. Either way the step is evaluated (with data.val) and saved;
    `failed`: the run then ends with an error (exit 3, `reason` as its one line), e.g. a strict guard's alarm (the
    checkpoint holds the weights the alarm was raised on: resume from an earlier one); else it ends normally."""

    reason: str
    failed: bool = False


class StepHook(Protocol):
    def on_step(self, report: StepReport) -> None: ...
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def stop_requested(self) -> StopRequest | None: ...
    # Optional: on_start(step) before the first step (after a resume: the step it resumes at); after_step(step,
    # metrics) once every hook's on_step has run, with what only then is known (time/hooks_s); close() at the end.


class Hooks:
    """Rank 0's hooks, called in order; one that raises is reported once and switched off."""

    def __init__(self, hooks: list[StepHook]):
        self.hooks = list(hooks)

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def _call(self, method: str, where: str, *args, alarms: list[str] | None = None) -> None:
        for hook in list(self.hooks):
            try:
                if method == "stop_requested":  # collects the answers into args[0]
                    if (request := hook.stop_requested()) is not None:
                        if not isinstance(request, StopRequest):
                            raise TypeError(f"stop_requested() returned {request!r}, not a StopRequest or None")
                        args[0].append(request)
                else:
                    getattr(hook, method, lambda *a: None)(*args)
            except Exception as exc:  # noqa: BLE001 - a broken hook must not take the run (and every rank) down
                line = (f"hook {type(hook).__name__} failed {where} and is switched off: "
                        f"{type(exc).__name__}: {exc}")
                print(f"error: {line}", file=sys.stderr, flush=True)
                self.hooks.remove(hook)
                if alarms is not None:
                    alarms.append(line)

    def on_start(self, step: int) -> None:
        self._call("on_start", "at the start", step)

    def on_step(self, report: StepReport) -> StopRequest | None:
        """Every hook's on_step, then the first stop request (a failing one before a plain one), then every hook's
        after_step with `time/hooks_s`: the seconds the hooks took at this step (added to report.metrics)."""
        started = time.perf_counter()
        where = f"at step {report.step}"
        self._call("on_step", where, report, alarms=report.alarms)
        requests: list[StopRequest] = []
        self._call("stop_requested", where, requests)
        late = {"time/hooks_s": time.perf_counter() - started}
        report.metrics.update(late)
        self._call("after_step", where, report.step, late)
        return next((r for r in requests if r.failed), requests[0] if requests else None)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._call("on_eval", f"at the evaluation of step {step}", step, metrics)

    def close(self) -> None:
        self._call("close", "when closing")
