"""TensorBoard scalars of every step and evaluation (tensorboard's own event files via torch.utils.tensorboard).

Tags: loss/total, loss/text, loss/audio, loss/audio_cb{k}; tokens/text_learnable, tokens/audio_learnable,
tokens/total, tokens/learnable_share; lr, grad_norm; throughput/* (tokens, samples, model TFLOP/s, mfu); time/step_s,
time/data_wait_share, time/eta_s; memory/peak_rss_gib (and memory/peak_gpu_gib on a GPU); data/{stream counter}
(planned, seen, corrupt, missing, dropped, too long samples; stray members, bad shards, blank and padding batches);
eval/... at each evaluation. Every `train.slice_every` steps the prediction-vs-label slices as text (slices/text,
slices/audio; hooks/slices.py), and once at the start one whole sample with its learnable spans marked
(sample/marked). The resolved config is recorded once as text. A resumed run purges the steps it repeats
(SummaryWriter purge_step)."""
from __future__ import annotations

import json
from pathlib import Path

LOG_DIR = "tensorboard"


class TensorBoardHook:
    def __init__(self, config):
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.directory = Path(config.train.out_dir) / LOG_DIR
        self._writer_class = SummaryWriter
        self.writer = None
        self.tokenizer = None
        self.marked = False
        if config.train.slice_every:
            from ..vocabulary import load_tokenizer

            self.tokenizer = load_tokenizer(config.model.tokenizer, "model.tokenizer")

    def on_start(self, step: int) -> None:
        """Called once before the first step (after a resume: the step it resumes at)."""
        self.writer = self._writer_class(str(self.directory), purge_step=step + 1 if step else None)
        if not step:
            text = json.dumps(self.config.to_dict(), indent=1)
            self.writer.add_text("config", f"```\n{text}\n```", 0)
            preflight = Path(self.config.train.out_dir) / "preflight.txt"
            if preflight.exists():
                self.writer.add_text("preflight", f"```\n{preflight.read_text()}\n```", 0)

    def on_step(self, report) -> None:
        step = report.step
        for name, value in report.metrics.items():
            self.writer.add_scalar(name, value, step)
        for name, value in report.stream.items():
            if name not in ("epoch", "position", "batches_per_epoch"):
                self.writer.add_scalar(f"data/{name}", value, step)
        self.writer.add_scalar("data/epoch", report.stream.get("epoch", 0), step)
        every = self.config.train.slice_every
        if every and report.predictions is not None and (step % every == 0 or step == 1):
            from .slices import audio_table, marked_sample, text_table

            self.writer.add_text("slices/text", text_table(report.predictions, self.tokenizer), step)
            self.writer.add_text("slices/audio", audio_table(report.predictions), step)
            if not self.marked:
                self.writer.add_text("sample/marked", marked_sample(report.predictions, self.tokenizer), step)
                self.marked = True
        self.writer.flush()  # a killed run keeps every step it logged (the resumed one purges what it repeats)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def stop_requested(self):
        return None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
