"""A StepHook for the engine tests (train.hooks=[hooks_for_tests:RecordAndStop], with tests/ on PYTHONPATH): it
writes what rank 0 receives to OUT/hook.jsonl and asks every rank to stop after step 2."""
from __future__ import annotations

import json
from pathlib import Path

from higgs_ds.hooks import StopRequest


class RecordAndStop:
    def __init__(self, config):
        self.path = Path(config.train.out_dir) / "hook.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.step = 0

    def on_step(self, report) -> None:
        self.step = report.step
        predictions = report.predictions or {}
        row = {"step": report.step, "total_steps": report.total_steps, "loss": report.metrics["loss/total"],
               "rank_learnable": report.rank_learnable, "stream": report.stream,
               "sample_keys": predictions.get("sample_keys"),
               "shapes": {k: list(v.shape) for k, v in predictions.items() if hasattr(v, "shape")}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def on_eval(self, step, metrics) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"eval_step": step, **metrics}) + "\n")

    def stop_requested(self) -> StopRequest | None:
        return StopRequest("RecordAndStop: step 2 reached") if self.step >= 2 else None


class FailsToStart:
    """A hook whose constructor raises (train.hooks=[hooks_for_tests:FailsToStart])."""

    def __init__(self, config):
        raise ConnectionError("the metrics server at 10.0.0.1:9000 refused the connection")
