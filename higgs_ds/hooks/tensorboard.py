"""TensorBoard event files laid out so that the first screen answers "is it learning?" (docs/monitoring.md, "Tags").

Two runs, sibling folders under OUT/tensorboard: `train` (every step) and `eval` (every evaluation). They write the
same loss tags, so TensorBoard draws train and eval as two lines of one chart. TensorBoard's Time Series view orders
its groups (a tag's text before the first `/`) by a natural sort and opens the first two, so the names are chosen for
it: `loss` (total, text, audio) and `loss_codebook` (cb0..cb7) come first; every other group sorts after them (optim,
problems, slices, stream, throughput, time, tokens, ...). The 8 codebooks also share one chart in the Custom Scalars
tab. `problems/*` sums what is zero in a healthy run (alarms, skipped steps, data problems); the stream's counters one
by one are in `stream/*`. Every alarm of a step (a guard's, a skipped step, a hook switched off) is a text entry
(`problems/alarm`) and counts in `problems/alarms` at its step, flushed before a strict guard stops the run.

metrics.jsonl keeps the metric names (loss/audio_cb0, eval/text, lr, ...): `tensorboard_tag` maps one to its
(run, tag), `metric_name` maps back. A resumed run purges the steps it repeats in both runs (purge_step)."""
from __future__ import annotations

import json
import re
from pathlib import Path

LOG_DIR = "tensorboard"
TRAIN, EVAL = "train", "eval"
# The stream's counters that stay zero in a healthy run: their sum is problems/data.
DATA_PROBLEMS = ("corrupt_samples", "missing_samples", "stray_members", "bad_shards", "blank_batches")
_CODEBOOK = re.compile(r"audio_cb(\d+)")
_RENAMED = {"lr": "optim/lr", "grad_norm": "optim/grad_norm", "train/skipped_steps": "problems/skipped_steps",
            "train/step_skipped": "problems/step_skipped"}


def tensorboard_tag(name: str) -> tuple[str, str]:
    """(run, tag) of a metric name: eval/x and loss/x share the tag (runs eval and train); codebooks go to
    loss_codebook/cb{k}; lr and grad_norm to optim/; the skip counters to problems/; data/ counters to stream/."""
    run = TRAIN
    if name.startswith("eval/"):
        run, name = EVAL, "loss/" + name[len("eval/"):]
    if name.startswith("loss/") and (cb := _CODEBOOK.fullmatch(name[len("loss/"):])):
        return run, f"loss_codebook/cb{cb.group(1)}"
    if name.startswith("data/"):
        return run, "stream/" + name[len("data/"):]
    return run, _RENAMED.get(name, name)


def metric_name(run: str, tag: str) -> str:
    """The inverse of tensorboard_tag (an eval tag other than a loss keeps its eval/ prefix)."""
    if tag.startswith("loss_codebook/cb"):
        tag = "loss/audio_cb" + tag[len("loss_codebook/cb"):]
    elif tag.startswith("stream/"):
        tag = "data/" + tag[len("stream/"):]
    else:
        tag = {v: k for k, v in _RENAMED.items()}.get(tag, tag)
    if run == EVAL:
        return "eval/" + (tag[len("loss/"):] if tag.startswith("loss/") else tag)
    return tag


def layout(num_codebooks: int) -> dict:
    """The Custom Scalars tab: the codebooks in one chart (Time Series cannot overlay tags), beside the losses."""
    codebooks = [f"loss_codebook/cb{k}" for k in range(num_codebooks)]
    return {"loss": {"text and audio (train and eval)": ["Multiline", ["loss/text", "loss/audio"]],
                     "codebooks (train and eval)": ["Multiline", codebooks]},
            "problems": {"alarms, skipped steps, data problems": ["Multiline", ["problems/alarms",
                                                                                "problems/skipped_steps",
                                                                                "problems/data"]]}}


class TensorBoardHook:
    def __init__(self, config, num_codebooks: int = 8):
        from torch.utils.tensorboard import SummaryWriter

        self.config, self.num_codebooks = config, num_codebooks
        self.directory = Path(config.train.out_dir) / LOG_DIR
        self._writer_class = SummaryWriter
        self.writers: dict[str, SummaryWriter] = {}
        self.tokenizer = None
        self.marked = False
        self.alarms = 0
        if config.train.slice_every:
            from ..vocabulary import load_tokenizer

            self.tokenizer = load_tokenizer(config.model.tokenizer, "model.tokenizer")

    def on_start(self, step: int) -> None:
        """Called once before the first step (after a resume: the step it resumes at)."""
        for run in (TRAIN, EVAL):
            self.writers[run] = self._writer_class(str(self.directory / run), purge_step=step + 1 if step else None)
        if not step:
            writer = self.writers[TRAIN]
            writer.add_custom_scalars(layout(self.num_codebooks))
            writer.add_text("config", f"```\n{json.dumps(self.config.to_dict(), indent=1)}\n```", 0)
            preflight = Path(self.config.train.out_dir) / "preflight.txt"
            if preflight.exists():
                writer.add_text("preflight", f"```\n{preflight.read_text()}\n```", 0)

    def _scalars(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            run, tag = tensorboard_tag(name)
            self.writers[run].add_scalar(tag, value, step)

    def on_step(self, report) -> None:
        step, writer = report.step, self.writers[TRAIN]
        self._scalars(report.metrics, step)
        for name, value in report.stream.items():
            if name not in ("epoch", "position", "batches_per_epoch"):
                writer.add_scalar(f"stream/{name}", value, step)
        writer.add_scalar("stream/epoch", report.stream.get("epoch", 0), step)
        writer.add_scalar("problems/data", sum(report.stream.get(name, 0) for name in DATA_PROBLEMS), step)
        self.alarms += len(report.alarms)
        writer.add_scalar("problems/alarms", self.alarms, step)
        if report.alarms:
            writer.add_text("problems/alarm", "\n\n".join(f"**{line}**" for line in report.alarms), step)
        every = self.config.train.slice_every
        if every and report.predictions is not None and (step % every == 0 or step == 1):
            from .slices import audio_table, marked_sample, text_table

            writer.add_text("slices/text", text_table(report.predictions, self.tokenizer), step)
            writer.add_text("slices/audio", audio_table(report.predictions), step)
            if not self.marked:
                writer.add_text("sample/marked", marked_sample(report.predictions, self.tokenizer), step)
                self.marked = True
        writer.flush()  # a killed run, or one a strict guard stops now, keeps every step it logged

    def after_step(self, step: int, metrics: dict[str, float]) -> None:
        self._scalars(metrics, step)  # time/hooks_s: this step's hooks, known once they all ran
        self.writers[TRAIN].flush()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._scalars(metrics, step)
        self.writers[EVAL].flush()

    def stop_requested(self):
        return None

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
