"""Cost of the rank-0 hooks (TensorBoard scalars and slices, collapse guard) as a share of step time, measured
inside one run (the time rank 0 spends in the hooks' on_step against the step's wall time), at the default
intervals and with slices every step. Run-to-run noise on this machine (±20 %) hides the cost between two runs.

    .venv/bin/python benchmarks/bench_hooks.py [--steps 60]

Trains the tiny example config (examples/tiny, 2 CPU ranks, ZeRO-3 fp32) on shards built from examples/tiny into a
temporary folder."""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "shards"
        subprocess.run([str(bin_dir / "higgs-build-shards"), str(ROOT / "examples/tiny/samples.jsonl"),
                        "--tokenizer", str(ROOT / "examples/tiny/tokenizer"), "--model-config",
                        str(ROOT / "examples/tiny"), "--out", str(shards), "--val-every", "6", "--shard-samples", "8"],
                       check=True, capture_output=True)
        rows = {}
        for name, extra in (("default intervals", []), ("slices every step", ["train.slice_every=1",
                                                                              "guards.check_every=1"])):
            out = Path(tmp) / name.replace(" ", "_")
            command = [str(bin_dir / "deepspeed"), "--num_gpus", "2", str(ROOT / "launch/train.py"), "--config",
                       str(ROOT / "examples/tiny/run.yaml"), f"data.train={shards}/train", f"data.val={shards}/val",
                       f"train.out_dir={out}", "train.epochs=100", f"train.max_steps={args.steps}",
                       "train.save_every=0", "train.eval_every=0", *extra]
            subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
            steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            hooks = sum(s["time/hooks_s"] for s in steps[1:])  # this step's hooks (the first step warms up)
            wall = sum(s["time/step_s"] for s in steps[1:])
            rows[name] = (hooks, wall, len(steps) - 1)
    print(f"{platform.machine()}, {args.steps} steps of the tiny example on 2 CPU ranks (ZeRO-3 fp32)")
    for name, (hooks, wall, n) in rows.items():
        print(f"{name:20s}: hooks {1000 * hooks / n:7.2f} ms/step of {1000 * wall / n:7.1f} ms/step = "
              f"{hooks / wall:.2%} of step time")


if __name__ == "__main__":
    main()
