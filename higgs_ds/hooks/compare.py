"""Compare runs from their TensorBoard event files (what TensorBoardHook writes): a table per loss tag (final, min,
mean of the last N steps), each run's step count, PNGs (the losses with train and eval together, the codebooks
overlaid in one panel), and an assert mode for regression checks (the second and later runs, or a stored
expected-loss file, against the first within tolerances) that reports per tag the first step beyond tolerance.

Two event-file layouts are read: the current one, OUT/tensorboard/train and OUT/tensorboard/eval (two TensorBoard
runs, so that TensorBoard overlays train and eval on one chart, with tags such as loss/text and
loss_codebook/cb3 in both), and the earlier single folder (events directly in OUT/tensorboard, tagged with the
metric names: loss/..., eval/..., lr, grad_norm, data/...). Either way the scalars come back under the metric names
of metrics.jsonl (`metric_name`), which the table, the expected-loss files and the goldens use."""
from __future__ import annotations

import argparse
import json
import math
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from .tensorboard import EVAL, LOG_DIR, TRAIN
from .tensorboard import metric_name as tensorboard_metric_name

RUN_FOLDERS = (TRAIN, EVAL)  # TensorBoardHook's runs under OUT/tensorboard
LOSSES = ("total", "text", "audio")
EVENTS = "events.out.tfevents.*"


def metric_name(run_folder: str, tag: str) -> str:
    """The metric name (metrics.jsonl's key) of TensorBoard tag `tag` in run folder `run_folder` ("train" or "eval",
    tensorboard.metric_name; "" for the earlier single-folder layout, whose tags are the metric names)."""
    if run_folder == "":
        return tag
    if run_folder not in (TRAIN, EVAL):
        raise ValueError(f"unknown TensorBoard run folder {run_folder!r} (expected train, eval or '' for the old "
                         "layout)")
    return tensorboard_metric_name(run_folder, tag)


def _read_folder(directory: Path, run_folder: str) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()  # this folder's event files only (EventAccumulator does not descend into subfolders)
    return {metric_name(run_folder, tag): {e.step: e.value for e in events.Scalars(tag)}
            for tag in events.Tags()["scalars"]}


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{metric name: {step: value}} of a run directory (train.out_dir) or its tensorboard/ folder, every event kept.
    Reads OUT/tensorboard/train and OUT/tensorboard/eval; events directly in OUT/tensorboard (the earlier layout)
    are read too, and where both hold a metric's step (a run started before the layout changed and resumed after
    it) the train/ and eval/ value wins."""
    directory = run / LOG_DIR if (run / LOG_DIR).is_dir() else run
    if directory.name in RUN_FOLDERS and directory.parent.name == LOG_DIR:  # OUT/tensorboard/train: the whole run
        directory = directory.parent
    if not directory.is_dir():
        raise SystemExit(f"{run}: no {LOG_DIR}/ event files")
    scalars: dict[str, dict[int, float]] = {}
    folders = [(directory, "")] if any(directory.glob(EVENTS)) else []
    folders += [(directory / name, name) for name in RUN_FOLDERS if any((directory / name).glob(EVENTS))]
    if not folders:
        raise SystemExit(f"{run}: no event files in {directory} (nor in its {' or '.join(RUN_FOLDERS)} folder)")
    for folder, run_folder in folders:
        for name, values in _read_folder(folder, run_folder).items():
            scalars.setdefault(name, {}).update(values)
    return scalars


def loss_tags(scalars: dict) -> list[str]:
    return sorted(t for t in scalars if t.startswith(("loss/", "eval/")))


def summary(values: dict[int, float], last: int) -> tuple[float, float, float]:
    steps = sorted(values)
    tail = [values[s] for s in steps[-last:]]
    return values[steps[-1]], min(values.values()), sum(tail) / len(tail)


def steps_text(steps) -> str:
    """1, 2, 3, 5, 10, 11 -> '1–3, 5, 10–11'."""
    steps, parts = sorted(steps), []
    for step in steps:
        if parts and step == parts[-1][1] + 1:
            parts[-1][1] = step
        else:
            parts.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in parts)


@dataclass
class Steps:
    """The steps a run (or an expected-loss file) has values at: training steps (loss/*) and evaluations (eval/*)."""
    train: list[int]
    evals: list[int]

    @classmethod
    def of(cls, scalars: dict) -> "Steps":
        def union(prefix):
            return sorted(set().union(*(scalars[t] for t in loss_tags(scalars) if t.startswith(prefix))))
        return cls(union("loss/"), union("eval/"))

    @property
    def last(self) -> int | None:
        return max(self.train + self.evals, default=None)

    def describe(self) -> str:
        train = (f"{len(self.train)} training step{'s' * (len(self.train) != 1)} ({steps_text(self.train)})"
                 if self.train else "no training steps")
        return train + (f", evaluated at {steps_text(self.evals)}" if self.evals else ", no evaluation")


def labels(names: list[str]) -> list[str]:
    """A, B, C, ... (then A1, B1, ...): the short names of the runs in the table, the report and the PNGs."""
    letters = string.ascii_uppercase
    return [letters[n % 26] + (str(n // 26) if n >= 26 else "") for n in range(len(names))]


def table(runs: dict[str, dict], last: int) -> str:
    """The legend (label = run), then per loss tag each run's final / min / mean of its last `last` values."""
    names = list(runs)
    short = labels(names)
    lines = [f"{label} = {name}" for label, name in zip(short, names)]
    tags = sorted(set().union(*(loss_tags(s) for s in runs.values())))
    lines += [f"{'tag':20s} " + " ".join(f"{label:>28s}" for label in short),
              f"{'':20s} " + " ".join(f"{'final / min / mean' + str(last):>28s}" for _ in names)]
    for tag in tags:
        cells = []
        for name in names:
            values = runs[name].get(tag)
            cells.append(" / ".join(f"{v:.4f}" for v in summary(values, last)) if values else "-")
        lines.append(f"{tag:20s} " + " ".join(f"{c:>28s}" for c in cells))
    return "\n".join(lines)


def steps_report(runs: dict[str, dict]) -> str:
    """One line per run: its training steps and evaluations; a run that ends before the first says so."""
    names = list(runs)
    short = labels(names)
    steps = [Steps.of(runs[name]) for name in names]
    lines = []
    for label, have in zip(short, steps):
        line = f"{label}: {have.describe()}"
        if have.last is not None and steps[0].last is not None and have.last < steps[0].last:
            line += f" — {label} stopped at step {have.last} of {steps[0].last}"
        elif have.last is not None and steps[0].last is not None and have.last > steps[0].last:
            line += f" — {label} ran to step {have.last}, beyond {short[0]}'s {steps[0].last} (not compared)"
        elif have.last is None:
            line += f" — {label} has no loss values"
        lines.append(line)
    return "\n".join(lines)


def _close(value: float, have: float, rtol: float, atol: float) -> bool:
    if math.isnan(value) or math.isnan(have):
        return math.isnan(value) and math.isnan(have)  # a NaN step of both (a planted NaN, a skipped step) agrees
    if math.isinf(value) or math.isinf(have):
        return value == have
    return abs(have - value) <= atol + rtol * abs(value)


def _tags_text(tags: list[str], expected: dict) -> str:
    """Tag names, with loss/* or eval/* standing for every such tag of `expected`."""
    tags, words = set(tags), []
    for prefix in ("loss/", "eval/"):
        family = {t for t in loss_tags(expected) if t.startswith(prefix)}
        if family and family <= tags:
            words.append(prefix + "*")
            tags -= family
    return ", ".join(words + sorted(tags))


def violations(expected: dict, got: dict, rtol: float, atol: float, names: tuple[str, str] = ("expected", "got")
               ) -> list[tuple[int, str, str]]:
    """What of `expected`'s loss tags `got` misses, as (step, tag, line) ordered by step then tag:
    - per tag, the first step both have where `got` differs by more than atol + rtol·|expected| (both values, the
      difference, how many shared steps differ and the largest difference);
    - once, the steps after `got`'s last step ("B stopped at step 1 of 20"), whichever tags they are of;
    - the tags or steps `got` lacks before its last step, grouped by the steps missing."""
    ref, new = names
    problems = []
    last, reference = Steps.of(got).last, Steps.of(expected)
    missing: dict[str, tuple[int, ...]] = {}
    for tag in loss_tags(expected):
        have = got.get(tag, {})
        beyond = [(step, value, have[step]) for step, value in sorted(expected[tag].items())
                  if step in have and not _close(value, have[step], rtol, atol)]
        shared = sum(step in have for step in expected[tag])
        if beyond:
            step, value, other = beyond[0]
            diff = other - value
            if math.isfinite(diff):
                difference = f"{new} − {ref} {diff:+.6f}" + (f" ({diff / abs(value):+.2%})" if value else "")
            else:
                difference = "not finite"
            line = (f"step {step} {tag}: {ref} {value:.6f}, {new} {other:.6f}, {difference}; "
                    f"beyond tolerance at {len(beyond)} of {shared} shared steps")
            finite = [(abs(o - v), s, o - v) for s, v, o in beyond if math.isfinite(o - v)]
            if len(beyond) > 1 and finite:
                _, where, largest = max(finite)
                line += f", the largest {largest:+.6f} at step {where}"
            problems.append((step, tag, line))
        gaps = tuple(s for s in sorted(expected[tag]) if s not in have and last is not None and s <= last)
        if gaps:
            missing[tag] = gaps
    if last is None:
        return problems + [(min(reference.train + reference.evals, default=0), "",
                            f"{new} has no loss values at all ({ref}: {reference.describe()})")]
    after = Steps([s for s in reference.train if s > last], [s for s in reference.evals if s > last])
    if after.last is not None:
        missed = ([f"training step{'s' * (len(after.train) > 1)} {steps_text(after.train)}"] if after.train else []
                  ) + ([f"evaluation{'s' * (len(after.evals) > 1)} at {steps_text(after.evals)}"] if after.evals
                       else [])
        problems.append((min(after.train + after.evals), "", f"{new} stopped at step {last} of {after.last}: "
                                                            f"{ref}'s {' and '.join(missed)} have no counterpart"))
    groups: dict[tuple[int, ...], list[str]] = {}
    for tag, gaps in missing.items():
        groups.setdefault(gaps, []).append(tag)
    for gaps, tags in groups.items():
        problems.append((gaps[0], tags[0], f"{new} has no {_tags_text(tags, expected)} at step"
                                            f"{'s' * (len(gaps) > 1)} {steps_text(gaps)} ({ref} has)"))
    return sorted(problems, key=lambda p: (p[0], p[1] == "", p[1]))


def figures(runs: dict[str, dict]) -> dict:
    """{"loss": total, text and audio side by side, each run's training curve (solid) with its evaluations (dashed,
    circles) in the run's colour; "codebooks": every codebook of every run overlaid in one panel (colour: codebook,
    line style: run: A solid, B dashed, C dotted, D dash-dot), the evaluations' codebooks in a second panel on the same
    steps}; a figure only when some run has its tags."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    names = list(runs)
    short = labels(names)
    styles = ["-", "--", ":", "-."]
    colours = colormaps["tab10"].colors
    made = {}

    def line(axis, values, **kwargs):
        steps = sorted(values)
        kwargs.setdefault("marker", "." if len(steps) < 30 else None)
        axis.plot(steps, [values[s] for s in steps], **kwargs)

    panels = [m for m in LOSSES if any(f"loss/{m}" in s or f"eval/{m}" in s for s in runs.values())]
    if panels:
        figure = Figure(figsize=(4.5 * len(panels), 3.6), layout="tight")
        for axis, loss in zip(figure.subplots(1, len(panels), squeeze=False)[0], panels):
            for n, (label, name) in enumerate(zip(short, names)):
                if f"loss/{loss}" in runs[name]:
                    line(axis, runs[name][f"loss/{loss}"], color=colours[n % 10], label=f"{label} train")
                if f"eval/{loss}" in runs[name]:
                    line(axis, runs[name][f"eval/{loss}"], color=colours[n % 10], linestyle="--", marker="o",
                         markersize=4, label=f"{label} eval")
            axis.set(title=loss, xlabel="step", ylabel="loss (nats)")
            axis.legend(fontsize=7)
        made["loss"] = figure

    splits = [(prefix, title) for prefix, title in (("loss/audio_cb", "train"), ("eval/audio_cb", "eval"))
              if any(t.startswith(prefix) for s in runs.values() for t in s)]
    if splits:
        codebooks = sorted({int(t[len(p):]) for p, _ in splits for s in runs.values() for t in s if t.startswith(p)})
        figure = Figure(figsize=(6 * len(splits) + 2, 4.2))
        for axis, (prefix, title) in zip(figure.subplots(1, len(splits), squeeze=False, sharex=True)[0], splits):
            for n, (label, name) in enumerate(zip(short, names)):
                for k in codebooks:
                    if f"{prefix}{k}" in runs[name]:
                        line(axis, runs[name][f"{prefix}{k}"], color=colours[k % 10], linestyle=styles[n % 4],
                             linewidth=1.2, markersize=3, label=f"{label} cb{k}",
                             marker="o" if title == "eval" else "." if len(runs[name][f"{prefix}{k}"]) == 1 else None)
            axis.set(title=f"per codebook, {title}", xlabel="step", ylabel="loss (nats)")
        handles = [Line2D([], [], color=colours[k % 10], label=f"cb{k}") for k in codebooks] + [
            Line2D([], [], color="black", linestyle=styles[n % 4], label=f"{label} {name[-30:]}")
            for n, (label, name) in enumerate(zip(short, names))]
        figure.legend(handles=handles, loc="center right", fontsize=7)
        figure.tight_layout(rect=(0, 0, 1 - 2 / figure.get_figwidth(), 1))
        made["codebooks"] = figure
    return made


def plot(runs: dict[str, dict], out: Path) -> list[Path]:
    """Writes the `figures` as OUT/loss.png and OUT/codebooks.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures(runs).items():
        written.append(out / f"{name}.png")
        figure.savefig(written[-1], dpi=100)
    return written


def parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="launch/compare_runs.py", formatter_class=HelpFormatter, description=(
        "Compare training runs' loss curves from their TensorBoard event files (OUT/tensorboard/{train,eval}, or "
        "the earlier single folder OUT/tensorboard): table, step counts, PNGs, regression asserts that report per "
        "tag the first step beyond tolerance, ordered by step. Runs are labelled A, B, C, ... in the order given."))
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (train.out_dir) or tensorboard/ folders")
    parser.add_argument("--last", type=int, default=5, help="steps the 'mean' column averages")
    parser.add_argument("--plots", type=Path, help="write loss.png (total, text, audio: train and eval) and "
                                                   "codebooks.png (every codebook of every run in one panel) here")
    parser.add_argument("--assert", dest="check", action="store_true",
                        help="exit 1 unless every later run matches the first within --rtol/--atol; reports "
                             "per loss tag the first step beyond them and where a run stopped, ordered by step")
    parser.add_argument("--expected", type=Path, help="exit 1 unless the (single) run matches this expected-loss "
                                                      "file within --rtol/--atol")
    parser.add_argument("--write-expected", type=Path, help="store the first run's loss tags as an expected file")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of --assert and --expected")
    parser.add_argument("--atol", type=float, default=1e-6, help="absolute tolerance of --assert and --expected")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    runs = {}
    for n, run in enumerate(args.runs):
        runs[str(run) if str(run) not in runs else f"{run}#{n}"] = read_scalars(run)
    print(table(runs, args.last))
    print(steps_report(runs))
    if args.plots:
        for path in plot(runs, args.plots):
            print(f"wrote {path}")
    short = dict(zip(runs, labels(list(runs))))
    first = next(iter(runs.values()))
    if args.write_expected:
        body = {tag: {str(step): value for step, value in sorted(first[tag].items())} for tag in loss_tags(first)}
        args.write_expected.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write_expected}")
    reports = []  # (heading, lines) per comparison
    if args.check:
        reference = next(iter(runs))
        for name, scalars in list(runs.items())[1:]:
            found = violations(first, scalars, args.rtol, args.atol, (short[reference], short[name]))
            if found:
                reports.append((f"{short[name]} against {short[reference]}", [line for _, _, line in found]))
    if args.expected:
        expected = {tag: {int(s): v for s, v in steps.items()} for tag, steps in
                    json.loads(args.expected.read_text()).items()}
        found = violations(expected, first, args.rtol, args.atol, ("expected", short[next(iter(runs))]))
        if found:
            reports.append((f"{short[next(iter(runs))]} against expected = {args.expected}",
                            [line for _, _, line in found]))
    if reports:
        for heading, lines in reports:
            print(f"FAIL: {heading} (rtol={args.rtol} atol={args.atol}): {len(lines)} problem"
                  f"{'s' * (len(lines) != 1)}, by step:", file=sys.stderr)
            print("\n".join(f"  {line}" for line in lines), file=sys.stderr)
        return 1
    if args.check or args.expected:
        print(f"OK: within rtol={args.rtol} atol={args.atol}")
    return 0
