"""Compare runs from their TensorBoard event files (what TensorBoardHook writes): a table per loss tag (final, min,
mean of the last N steps), one PNG per tag group (a line per run), and an assert mode for regression checks (the
second and later runs, or a stored expected-loss file, against the first within tolerances)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .tensorboard import LOG_DIR

GROUPS = {"loss": ("loss/total", "loss/text", "loss/audio"), "codebooks": "loss/audio_cb", "eval": "eval/"}


def read_scalars(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run directory (its tensorboard/ folder), every event kept."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory = run / LOG_DIR if (run / LOG_DIR).is_dir() else run
    if not directory.is_dir():
        raise SystemExit(f"{run}: no {LOG_DIR}/ event files")
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def loss_tags(scalars: dict) -> list[str]:
    return sorted(t for t in scalars if t.startswith(("loss/", "eval/")))


def summary(values: dict[int, float], last: int) -> tuple[float, float, float]:
    steps = sorted(values)
    tail = [values[s] for s in steps[-last:]]
    return values[steps[-1]], min(values.values()), sum(tail) / len(tail)


def table(runs: dict[str, dict], last: int) -> str:
    names = list(runs)
    tags = sorted(set().union(*(loss_tags(s) for s in runs.values())))
    head = f"{'tag':20s} " + " ".join(f"{n[-24:]:>26s}" for n in names)
    lines = [head, f"{'':20s} " + " ".join(f"{'final / min / mean' + str(last):>26s}" for _ in names)]
    for tag in tags:
        cells = []
        for name in names:
            values = runs[name].get(tag)
            cells.append(" / ".join(f"{v:.4f}" for v in summary(values, last)) if values else "-")
        lines.append(f"{tag:20s} " + " ".join(f"{c:>26s}" for c in cells))
    return "\n".join(lines)


def plot(runs: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for group, selector in GROUPS.items():
        tags = sorted({t for s in runs.values() for t in loss_tags(s)
                       if (t in selector if isinstance(selector, tuple) else t.startswith(selector))})
        if not tags:
            continue
        figure, axes = plt.subplots(1, len(tags), figsize=(4 * len(tags), 3.2), squeeze=False)
        for axis, tag in zip(axes[0], tags):
            for name, scalars in runs.items():
                if tag in scalars:
                    steps = sorted(scalars[tag])
                    axis.plot(steps, [scalars[tag][s] for s in steps], label=name, marker="." if len(steps) < 30
                              else None)
            axis.set_title(tag)
            axis.set_xlabel("step")
            axis.set_ylabel("loss (nats)")
            axis.legend(fontsize=7)
        figure.tight_layout()
        path = out / f"{group}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def violations(expected: dict, got: dict, rtol: float, atol: float) -> list[str]:
    """Every (tag, step) of `expected`'s loss tags that `got` lacks or misses by more than atol + rtol·|expected|."""
    problems = []
    for tag in loss_tags(expected):
        for step, value in sorted(expected[tag].items()):
            have = got.get(tag, {}).get(step)
            if have is None or not math.isfinite(have) or abs(have - value) > atol + rtol * abs(value):
                problems.append(f"{tag} step {step}: expected {value:.6f}, got {have}")
    return problems


def parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="launch/compare_runs.py", formatter_class=HelpFormatter, description=(
        "Compare training runs' loss curves from their TensorBoard event files: table, PNGs, regression asserts."))
    parser.add_argument("runs", type=Path, nargs="+", help="run directories (train.out_dir) or tensorboard/ folders")
    parser.add_argument("--last", type=int, default=5, help="steps the 'mean' column averages")
    parser.add_argument("--plots", type=Path, help="write one PNG per tag group (loss, codebooks, eval) here")
    parser.add_argument("--assert", dest="check", action="store_true",
                        help="exit 1 unless every later run matches the first within --rtol/--atol")
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
    if args.plots:
        for path in plot(runs, args.plots):
            print(f"wrote {path}")
    first = next(iter(runs.values()))
    if args.write_expected:
        body = {tag: {str(step): value for step, value in sorted(first[tag].items())} for tag in loss_tags(first)}
        args.write_expected.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        print(f"wrote {args.write_expected}")
    problems = []
    if args.check:
        for name, scalars in list(runs.items())[1:]:
            problems += [f"{name}: {p}" for p in violations(first, scalars, args.rtol, args.atol)]
    if args.expected:
        expected = {tag: {int(s): v for s, v in steps.items()} for tag, steps in
                    json.loads(args.expected.read_text()).items()}
        problems += [f"{args.expected.name}: {p}" for p in violations(expected, first, args.rtol, args.atol)]
    if problems:
        print(f"FAIL: {len(problems)} losses outside rtol={args.rtol} atol={args.atol}:", file=sys.stderr)
        print("\n".join(problems[:20]), file=sys.stderr)
        return 1
    if args.check or args.expected:
        print(f"OK: within rtol={args.rtol} atol={args.atol}")
    return 0
