"""The demo end to end on this machine: generated data with a known loss floor -> shards -> a 2-rank CPU DeepSpeed
ZeRO-3 run (TensorBoard, guards) -> evaluation -> export (both layouts) -> the final losses next to the floor.

    ./demo.sh [--out DIR] [--steps N] [section.key=value ...]

Under --out (default: outputs/demo in the repository):
  data/     the corpus (examples/demo/make_corpus.py) and floor.json; regenerated only when params.json,
            make_corpus.py or the model config changed (data/stamp.json)
  shards/   train/train and val/val; rebuilt only when the data stamp or the shards' fingerprint (tokenizer, audio
            settings) changed, so a rerun reuses them
  runs/     one fresh run directory per invocation (runs/YYYYmmdd-HHMMSS): a rerun never resumes or overwrites an
            earlier run. Each holds tensorboard/, checkpoints/, export/{port,boson}/, train.log, demo_summary.json
Extra arguments are run-config overrides for launch/train.py (e.g. optim.lr=3e-3).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent  # the venv's: deepspeed, tensorboard
TRAIN = ROOT / "launch" / "train.py"
sys.path.insert(0, str(ROOT))  # this checkout's code, also when run as a plain script
NOISE_SE = 3.0  # below the floor by more than this many standard errors: not sampling noise
GUARD_TOLERANCE = 0.8  # the guard's floor: 80 % of the true floor (a train batch's loss scatters about ±0.2 around it)


def log(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_env(**defaults: str) -> dict[str, str]:
    """The environment of the demo's steps: this checkout's code first on the path."""
    return {**defaults, **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def call(command: list, **kwargs) -> subprocess.CompletedProcess:
    """A step of the demo (cwd: the repository root); fails loudly."""
    done = subprocess.run([str(c) for c in command], cwd=ROOT, env=code_env(), text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"[demo] failed ({done.returncode}): {' '.join(map(str, command))}\n{done.stderr or ''}")
    return done


def data(out: Path) -> tuple[Path, dict]:
    """The generated corpus, regenerated only when its inputs changed."""
    stamp = sha256(HERE / "params.json", HERE / "make_corpus.py", HERE / "config.json")
    folder = out / "data"
    if (folder / "stamp.json").exists() and json.loads((folder / "stamp.json").read_text())["inputs"] == stamp:
        log(f"data: reusing {folder}")
    else:
        log(f"data: generating {folder}")
        partial = out / f"data.partial-{os.getpid()}"  # in place only when complete: an interrupted run leaves none
        shutil.rmtree(partial, ignore_errors=True)
        call([sys.executable, HERE / "make_corpus.py", partial], capture_output=True)  # its floor: printed below
        (partial / "stamp.json").write_text(json.dumps({"inputs": stamp}) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    return folder, json.loads((folder / "floor.json").read_text())


def shards(out: Path, data_dir: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """train/train and val/val, reused when built from this data for this tokenizer and model config."""
    from transformers import AutoTokenizer

    from higgs_ds.data.shards import Manifest, data_fingerprint
    from higgs_ds.data.tokens import SpecialTokens
    from higgs_ds.model_config import read_model_config

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = read_model_config(HERE, tokenizer)
    fingerprint = data_fingerprint(tokenizer, SpecialTokens.from_tokenizer(tokenizer, config.pad_token_id),
                                   config.audio)
    source = {"data": json.loads((data_dir / "stamp.json").read_text())["inputs"]}
    folder = out / "shards"
    splits = {"train": folder / "train" / "train", "val": folder / "val" / "val"}
    try:
        same = json.loads((folder / "source.json").read_text()) == source and all(
            Manifest.load(path).fingerprint == json.loads(json.dumps(fingerprint)) for path in splits.values())
    except (OSError, ValueError):
        same = False
    if same:
        log(f"shards: reusing {folder} (same data, same fingerprint)")
        return splits["train"], splits["val"]
    log(f"shards: building {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    for split in ("train", "val"):
        # val.jsonl with --val-every 1: every sample into the split named val
        call([sys.executable, "-m", "data_tools.build_shards", data_dir / f"{split}.jsonl", "--tokenizer",
              tokenizer_dir, "--model-config", HERE, "--out", folder / split, "--shard-samples", 1000,
              *(["--val-every", 1] if split == "val" else [])], capture_output=True)
    (folder / "source.json").write_text(json.dumps(source) + "\n")
    return splits["train"], splits["val"]


def check_counts(floor: dict, val: Path) -> None:
    """The floor divides by the learnt labels: they must be the shard builder's counts of the same samples."""
    from higgs_ds.data.shards import Manifest

    totals = Manifest.load(val).totals
    if (totals["learnable_text_tokens"], totals["learnable_audio_tokens"]) != (floor["text_labels"],
                                                                             sum(floor["audio_labels"])):
        sys.exit(f"[demo] floor.json counts {floor['text_labels']} text / {sum(floor['audio_labels'])} audio labels, "
                 f"the val manifest {totals['learnable_text_tokens']} / {totals['learnable_audio_tokens']}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run: Path, train_split: Path, val_split: Path, floor: dict, steps: int, overrides: list[str]) -> list[str]:
    """The 2-rank launch, its output shown as it comes and kept in run/train.log; returns the alarm lines."""
    command = [BIN / "deepspeed", "--num_gpus", 2, "--master_port", free_port(), TRAIN,
               "--config", HERE / "run.yaml", f"data.train={train_split}", f"data.val={val_split}",
               f"train.out_dir={run}", f"train.max_steps={steps}",
               f"guards.audio_loss_floor={GUARD_TOLERANCE * floor['audio_floor']:.4f}", *overrides]
    env = code_env(OMP_NUM_THREADS="1")  # 2 ranks on 2 cores, unless the caller says otherwise
    log(f"training: {' '.join(map(str, command))}")
    run.mkdir(parents=True)
    alarms, kinds = [], set()
    with open(run / "train.log", "w") as keep:
        process = subprocess.Popen([str(c) for c in command], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in process.stdout:
            keep.write(line)
            if "COLLAPSE ALARM" in line:
                alarms.append(line.strip())
                kind = re.sub(r"\d+(\.\d+)?", "#", line)  # the same alarm at another step or loss value
                show = kind not in kinds
                kinds.add(kind)
            else:
                show = line.startswith(("step ", "eval step", "done:")) or "error" in line
            if show:  # progress and each kind of alarm once; DeepSpeed's chatter and the rest stay in train.log
                print(line, end="", flush=True)
    if process.wait() != 0:
        tail = "".join((run / "train.log").read_text().splitlines(keepends=True)[-20:])
        sys.exit(f"{tail}[demo] training failed ({process.returncode}); the whole output: {run / 'train.log'}")
    return alarms


def gap(loss: float, floor: float, uniform: float) -> float:
    """Where a loss sits between the floor (0) and the uniform baseline (1)."""
    return (loss - floor) / (uniform - floor)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo.sh", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo",
                        help="output root (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides for launch/train.py")
    args = parser.parse_args(argv)
    started = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = ROOT / "examples" / "tiny" / "tokenizer"
    data_dir, floor = data(out)
    train_split, val_split = shards(out, data_dir, tokenizer_dir)
    check_counts(floor, val_split)
    log(f"floor (val): text {floor['text_floor']:.4f}, audio {floor['audio_floor']:.4f} ± "
        f"{floor['audio_floor_se']:.4f}; uniform: text {floor['uniform_text']:.4f}, audio "
        f"{floor['uniform_audio']:.4f}. The train split's floor, for TensorBoard's loss/* curves: text "
        f"{floor['train']['text_floor']:.4f}, audio {floor['train']['audio_floor']:.4f}")

    run = out / "runs" / time.strftime("%Y%m%d-%H%M%S")
    while run.exists():  # two runs within a second
        run = run.with_name(run.name + "-1")
    alarms = train(run, train_split, val_split, floor, args.steps, args.overrides)

    from higgs_ds.hooks.compare import read_scalars

    scalars = read_scalars(run)
    final_step = max(scalars["eval/total"])
    run_eval = {m: scalars[f"eval/{m}"][final_step] for m in ("text", "audio")}
    log("evaluating the final checkpoint on val (launch/evaluate.py)")
    done = call([sys.executable, ROOT / "launch" / "evaluate.py", run, "--split", val_split, "--json"],
                capture_output=True)
    evaluated = json.loads(done.stdout[done.stdout.index("{"):])
    log("exporting (launch/export.py --layout both)")
    call([sys.executable, ROOT / "launch" / "export.py", run, "--out", run / "export", "--layout", "both"],
         capture_output=True)

    summary = {"run": str(run), "steps": final_step, "floor": floor, "run_eval": run_eval,
               "evaluate": {m: evaluated[f"loss/{m}"] for m in ("text", "audio")},
               "alarms": alarms, "seconds": round(time.time() - started, 1)}
    (run / "demo_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\n{'':26s}{'text':>10s}{'audio':>10s}")
    rows = [("floor (val, expected)", floor["text_floor"], floor["audio_floor"]),
            ("perfect model on val", floor["process_text"], floor["process_audio"]),
            (f"run's eval, step {final_step}", run_eval["text"], run_eval["audio"]),
            ("launch/evaluate.py", summary["evaluate"]["text"], summary["evaluate"]["audio"]),
            ("uniform baseline", floor["uniform_text"], floor["uniform_audio"])]
    for name, text, audio in rows:
        print(f"{name:26s}{text:10.4f}{audio:10.4f}")
    print(f"(the floor is an expectation: a perfect model's loss on these val samples is the row below it; their "
          f"standard error about the floor: {floor['text_floor_se']:.4f} text, {floor['audio_floor_se']:.4f} audio)")
    for m in ("text", "audio"):
        share = gap(run_eval[m], floor[f"{m}_floor"], floor[f"uniform_{m}"])
        noise = NOISE_SE * floor[f"{m}_floor_se"]
        if share >= 0:
            print(f"{m}: {share:.1%} of the way from the floor to uniform")
        elif run_eval[m] >= floor[f"{m}_floor"] - noise:
            print(f"{m}: at the floor, within sampling noise ({NOISE_SE:g} standard errors)")
        else:
            print(f"{m}: BELOW the floor by {-share:.1%} of the range, more than sampling noise allows: impossible "
                  "without a leak of the labels")
    print(f"collapse alarms: {len(alarms)} (the guard warns on every step it fires; all of them are in train.log)"
          if alarms else "collapse alarms: none")
    print(f"\nrun directory   {run}\ncheckpoint      {run / 'checkpoints'}\nexport          {run / 'export'}/"
          f"{{port,boson}}\nsummary         {run / 'demo_summary.json'}\nTensorBoard     {BIN / 'tensorboard'} "
          f"--logdir {run / 'tensorboard'}    (all runs: --logdir {out / 'runs'})\ntook {summary['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
