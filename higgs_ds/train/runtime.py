"""The training process: the command line, preflight before any process group, the process group, rank 0's hooks,
the trainer, and how the process ends. Every way it ends says so once, from rank 0: a config or data problem as
one `error:` line (exit 2), a stopped run (exit 3), a failed save (exit 1), Ctrl-C / SIGTERM as one line with the
step, the last checkpoint and how to resume (exit 130)."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .checkpointing import CheckpointError
from .config import RunConfig, RunConfigError
from .preflight import Setup, dry_run, hook_class, preflight
from .trainer import Trainer, TrainingStopped

log = logging.getLogger("higgs_ds.train")


def this_rank() -> int:
    """The global rank the launcher gave this process (0 when run alone), known before any process group."""
    return int(os.environ.get("RANK", 0))


def say(message: str) -> None:
    """One line on stderr, from rank 0 only: every rank fails alike, the user reads it once."""
    if this_rank() == 0:
        print(message, file=sys.stderr, flush=True)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM (Ctrl-C reaches every rank of the job; the launcher forwards its own as SIGTERM); the
    message is the line rank 0 prints."""


class _Interrupts:
    seen: int | None = None  # the first signal


def _interrupt(signum, frame):
    if _Interrupts.seen:  # the launcher's SIGTERM after Ctrl-C, or a second Ctrl-C: already on the way out
        return
    _Interrupts.seen = signum
    # The launcher terminates our DataLoader workers too. Now that is expected: torch's SIGCHLD handler would report
    # it as a failure, and the threads that talk to the workers (multiprocessing's resource sharer) would print the
    # broken connection; rank 0's one line says what happened.
    # (Python no-ops, not SIG_DFL: CPython reports a signal pending while its handler becomes SIG_DFL/SIG_IGN.)
    signal.signal(signal.SIGCHLD, lambda *args: None)
    sys.excepthook = threading.excepthook = lambda *args: None
    raise KeyboardInterrupt


def interrupted() -> bool:
    """This process has had its SIGINT/SIGTERM (calling this runs a pending handler first: it raises then)."""
    return _Interrupts.seen is not None


def start_process_group() -> None:
    """deepspeed.init_distributed, with a busy rendezvous port named (two runs on one machine with the launcher's
    default port); then each rank unlinks its own CPU shared-memory all-reduce buffer."""
    import deepspeed

    pin_device()
    try:
        deepspeed.init_distributed()
    except RuntimeError as exc:
        if "EADDRINUSE" in str(exc) or "address already in use" in str(exc).lower():
            raise RunConfigError(f"the rendezvous port {os.environ.get('MASTER_PORT')} on "
                                 f"{os.environ.get('MASTER_ADDR')} is in use (another run on this machine?): choose a "
                                 "free one with --master_port") from None
        raise
    unlink_shared_memory()


def pin_device() -> None:
    """This rank's accelerator (LOCAL_RANK) as the current device before any collective: the stream agrees on its
    batch count (an all-reduce on the current device) before deepspeed.initialize would set it."""
    import deepspeed

    accelerator = deepspeed.get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def unlink_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce keeps a /dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{local rank} per
    rank (≈ 66 MiB of RAM each) and never removes it. Every rank maps every buffer during init_distributed, so
    after a barrier each rank unlinks its own name: the memory stays mapped while the run lives and is freed when
    it ends, however it ends (a kill -9 included)."""
    import glob

    import torch.distributed as dist

    dist.barrier()
    pattern = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '*')}_"
               f"{os.environ.get('MASTER_PORT', '*')}_{os.environ.get('LOCAL_RANK', '0')}")
    for path in glob.glob(pattern):
        Path(path).unlink(missing_ok=True)


def rank0_hooks(config: RunConfig, setup: Setup, extra: list = ()) -> list:
    """Rank 0's hooks, built before the process group: one that cannot start is one `error:` line."""
    from ..hooks import CollapseGuard, TensorBoardHook

    # The order they run in: the guards first and TensorBoard last, so that it records every alarm of the step.
    m, builders = setup.model_config, []
    if config.guards.enabled:
        builders.append(("guards", lambda: CollapseGuard(config, m.ids_per_codebook, m.num_codebooks)))
    builders += [("", lambda hook=hook: hook) for hook in extra]
    builders += [(spec, lambda spec=spec: hook_class(spec)(config)) for spec in config.train.hooks]
    if config.train.tensorboard:
        builders.append(("train.tensorboard", lambda: TensorBoardHook(config, m.num_codebooks)))
    hooks = []
    for name, build in builders:
        try:
            hooks.append(build())
        except Exception as exc:  # noqa: BLE001 - a user's hook may raise anything
            raise RunConfigError(f"{name}: the hook cannot start ({type(exc).__name__}: {exc})") from None
    return hooks


def run(config: RunConfig, dry: bool = False, hooks: list = (), world_size: int | None = None) -> int:
    from ..hooks import Hooks

    world_size = world_size or int(os.environ.get("WORLD_SIZE", 1))
    # Before any process group: a bad config stops here.
    setup = preflight(config, world_size, this_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    for spec in config.train.hooks:
        hook_class(spec)
    if dry:  # stdout holds the JSON alone (`--dry-run > plan.json`); the summaries go to stderr
        report = dry_run(setup)
        print(f"{setup.masking}\nmemory: {report['memory_estimate']['summary']}", file=sys.stderr, flush=True)
        print(json.dumps(report, indent=1, default=str), flush=True)
        return 0
    rank0 = this_rank() == 0
    if rank0:
        print(setup.masking, flush=True)
    rank0_only = rank0_hooks(config, setup, list(hooks)) if rank0 else []
    start_process_group()
    trainer = Trainer(setup, Hooks(rank0_only))
    out = Path(config.train.out_dir)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
        (out / "preflight.txt").write_text(setup.masking + "\n")
    try:
        try:
            trainer.resume()
            final = trainer.train()
        except Exception:
            if interrupted():  # a collective that another rank's Ctrl-C broke
                raise KeyboardInterrupt from None
            raise
    except KeyboardInterrupt:
        raise Interrupted(interrupted_line(trainer, config)) from None
    finally:
        trainer.close()
        trainer.hooks.close()
    if rank0:
        print(f"done: step {trainer.step}, checkpoints in {out / 'checkpoints'}", flush=True)
        (out / "final_metrics.json").write_text(json.dumps(final, indent=1) + "\n")
    return 0


def interrupted_line(trainer: Trainer, config: RunConfig) -> str:
    # SIGTERM: the launcher ends every rank when one of them fails (its error is above), or the job was cancelled
    how = ("interrupted" if _Interrupts.seen == signal.SIGINT else
           "stopped by SIGTERM (a failed rank above, or the job was cancelled)")
    if trainer.last_checkpoint is None:
        return f"{how} at step {trainer.step}: no checkpoint was saved yet; the same command starts over"
    again = " (the same command with train.resume=auto)" if config.train.resume != "auto" else " (the same command)"
    return (f"{how} at step {trainer.step}: the last checkpoint is {trainer.last_checkpoint}; continue from it with "
            f"train.resume=auto{again}")


def parser():
    import argparse

    from ..cli import HelpFormatter

    parser = argparse.ArgumentParser(prog="launch/train.py", formatter_class=HelpFormatter, description=(
        "Train Higgs Audio v2 under DeepSpeed ZeRO from higgs-ds shards (run with deepspeed, torchrun or python)."))
    parser.add_argument("--config", help="run YAML (higgs_ds.train.config.RunConfig)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config, data plan and memory "
                                                               "estimate, then exit (no process group)")
    parser.add_argument("--world-size", type=int, help="with --dry-run: plan the data and estimate memory for this "
                                                          "many GPUs (default: this launch's world size)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the launcher's
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=100")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`deepspeed launch/train.py --config run.yaml [section.key=value ...] [--dry-run]`"""
    from .config import load_config

    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, _interrupt)
    hooks = sys.excepthook, threading.excepthook
    _Interrupts.seen = None
    try:
        config = load_config(args.config, args.overrides)
        if args.world_size is not None and (not args.dry_run or args.world_size < 1):
            raise RunConfigError("--world-size N (N >= 1) goes with --dry-run")
        return run(config, dry=args.dry_run, world_size=args.world_size)
    except RunConfigError as exc:
        say(f"error: {exc}")
        return 2
    except TrainingStopped as exc:
        say(f"error: {exc}")
        return 3
    except CheckpointError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt as exc:
        say(str(exc) if isinstance(exc, Interrupted) else "interrupted before the first step; nothing was trained")
        return 130
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        sys.excepthook, threading.excepthook = hooks
