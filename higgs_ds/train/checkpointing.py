"""Crash-safe DeepSpeed checkpoints and resuming from them (docs/design.md §8): a tag counts only once it is marked
complete, and a complete tag is checked against the sizes it recorded before a run resumes from it.

    OUT/checkpoints/step00000100/      DeepSpeed's files (save_latest=False: no `latest` written in place)
                                       rank{r}.pt: that rank's stream state and RNG states (torch.load weights_only)
                                       client.json: step, config fingerprint, world size, schedule position, skips
                                       COMPLETE: written last, atomically, after every rank's files (barriers); it
                                       lists every file of the tag with its size
A crash at any point leaves the previous complete tag loadable; `resume=auto` takes the newest complete tag whose
files still have their recorded sizes (a truncated file sends it to the one before, with a line saying so). Older
complete tags beyond `keep_last` and every incomplete tag older than the newest complete are pruned afterwards."""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..data.shards import atomic_write
from .config import RunConfigError

COMPLETE = "COMPLETE"
TAG = re.compile(r"step\d{8}")
log = logging.getLogger("higgs_ds.train")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (every rank raises it at the same save); the message is one line."""


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def tags(directory: Path) -> list[Path]:
    """The tag directories (stepNNNNNNNN, complete or not), oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and TAG.fullmatch(p.name))


def complete_tags(directory: Path) -> list[Path]:
    """Complete checkpoint tags, oldest first."""
    return [p for p in tags(directory) if (p / COMPLETE).is_file()]


def set_aside_newer(directory: Path, step: int) -> tuple[list[str], list[str]]:
    """Rank 0, before a run's first save: the tags after `step`, where it starts, stop being tags. A complete one is
    renamed TAG.set-aside (kept): a damaged checkpoint `resume=auto` skipped, or a future the run does not continue
    (an explicit older `train.resume`, or `resume=none` in a used folder). An incomplete one (its save never
    finished; nothing in it can be loaded) is removed, as pruning removes incomplete tags. Pruning by name would
    otherwise keep them as the newest and delete the run's own new checkpoints. Returns (set aside, removed)."""
    moved, removed = [], []
    for path in tags(directory):
        if int(path.name[len("step"):]) <= step:
            continue
        if not (path / COMPLETE).is_file():
            shutil.rmtree(path)
            removed.append(path.name)
            continue
        target = path.with_name(f"{path.name}.set-aside")
        if target.exists():
            shutil.rmtree(target)
        path.rename(target)
        moved.append(path.name)
    return moved, removed


def latest(directory: Path) -> Path | None:
    tags = complete_tags(directory)
    return tags[-1] if tags else None


# ------------------------------------------------------------------------------------------------ saving


def save(engine, directory: Path, step: int, rank_state: dict[str, Any], client: dict[str, Any], rank: int,
         keep_last: int, adapters_only: bool = False) -> Path:
    """Every rank calls it. `rank_state` is this rank's (stream state, RNG); `client` is rank 0's. `adapters_only`
    (LoRA): the trained parameters and their optimizer state only, no frozen base weights. A write that fails on
    any rank (a full disk) raises CheckpointError on every rank at the same point; the previous complete tag stays
    as it was. Every rank passes the same collectives whatever fails where: each stage ends in a vote."""
    import torch.distributed as dist

    path = directory / tag_name(step)
    failure = None
    if rank == 0:  # before DeepSpeed's own barriers, so that a failure here cannot put them out of step
        try:
            if path.exists():  # a crashed earlier attempt at this step: start it over
                shutil.rmtree(path)
            path.mkdir(parents=True)
        except OSError as exc:
            failure = exc
    _stop_if_any(failure, engine.device, path, directory)
    try:
        engine.save_checkpoint(str(directory), tag=path.name, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=adapters_only)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a full disk as a RuntimeError
        failure = exc
        # DeepSpeed (0.19.8) writes between its tag check and a closing barrier: the other ranks wait in that one.
        dist.barrier()
    if failure is None:
        try:
            torch.save(rank_state, path / f"rank{rank}.pt")
        except (OSError, RuntimeError) as exc:
            failure = exc
    _stop_if_any(failure, engine.device, path, directory)
    if rank == 0:
        try:
            atomic_write(path / "client.json", json.dumps(client, indent=1, sort_keys=True).encode())
            mark_complete(path)
            _prune(directory, keep_last)
        except OSError as exc:
            failure = exc
    _stop_if_any(failure, engine.device, path, directory)
    return path


def _stop_if_any(failure: BaseException | None, device, path: Path, directory: Path) -> None:
    """A vote (one all-reduce): every rank raises CheckpointError if any rank's `failure` is set."""
    import torch.distributed as dist

    failed = torch.tensor([float(failure is not None)], device=device)  # NCCL reduces device tensors
    dist.all_reduce(failed)
    if failed.item():
        reason = failure if failure is not None else RuntimeError("a write failed on another rank")
        raise CheckpointError(write_failure(path, reason, latest(directory)))


def write_failure(path: Path, exc: BaseException, previous: Path | None) -> str:
    """One line for a checkpoint that could not be written, with the free space where it was going."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    reason = " ".join(str(exc).split())[:300]
    # torch's writer loses the errno of a full disk ("unexpected pos 128 vs 0"): tell it by the space left
    if getattr(exc, "errno", None) == errno.ENOSPC or (free is not None and free < 64 * 2**20):
        reason = "no space left on device"
    where = f" ({free / 2**30:.2f} GiB free there)" if free is not None else ""
    keep = f"the previous checkpoint {previous} is intact" if previous is not None else "no earlier checkpoint"
    return f"saving checkpoint {path} failed: {reason}{where}; {keep}"


def mark_complete(path: Path) -> None:
    """COMPLETE, written atomically once every rank's files are in: the size of each file of the tag, so that a
    later resume can tell a truncated file without reading it."""
    sizes = {str(f.relative_to(path)): f.stat().st_size for f in sorted(path.rglob("*")) if f.is_file()}
    atomic_write(path / COMPLETE, json.dumps({"files": sizes}, indent=1).encode())


def _prune(directory: Path, keep_last: int) -> None:
    complete = complete_tags(directory)
    newest = complete[-1]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for p in tags(directory):
        if not (p / COMPLETE).exists() and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ choosing a tag


def damage(tag: Path) -> list[str]:
    """What is wrong with a complete tag's files (missing, or not the size COMPLETE recorded), by name; [] when
    they check out. Tags written before sizes were recorded (an empty COMPLETE) are taken as they are."""
    try:
        text = (tag / COMPLETE).read_text()
        recorded = json.loads(text)["files"] if text.strip() else {}
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{tag / COMPLETE} is unreadable"]
    problems = []
    for name, size in recorded.items():
        file = tag / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != size:
            problems.append(f"{file} has {file.stat().st_size} bytes, {size} were written")
    return problems


def resume_target(checkpoints: Path, choice: str, announce: bool = True) -> Path | None:
    """The tag a run resumes from (before any process group; every rank decides alike from the files). `auto`:
    the newest complete tag that checks out, or None when there is none; a damaged newer tag is skipped with a
    warning (printed when `announce`). A named tag must be complete and check out."""
    if choice == "none":
        return None
    if choice != "auto":
        path = Path(choice)
        if not (path / COMPLETE).is_file():
            raise RunConfigError(f"train.resume {path}: not a complete checkpoint (no {COMPLETE})")
        if problems := damage(path):
            raise RunConfigError(f"train.resume {path}: damaged: {'; '.join(problems)}")
        return path
    skipped = []
    for tag in reversed(complete_tags(checkpoints)):
        problems = damage(tag)
        if not problems:
            if skipped and announce:
                print(f"warning: resuming from {tag}: skipped the damaged newer {'; '.join(skipped)}",
                      file=sys.stderr, flush=True)
            return tag
        skipped.append(f"{tag.name} ({', '.join(problems)})")
    if skipped:
        raise RunConfigError(f"train.resume=auto: every checkpoint in {checkpoints} is damaged: {'; '.join(skipped)}"
                             " — remove them, or start over with train.resume=none")
    return None


# ------------------------------------------------------------------------------------------------ reading


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    return torch.load(path / f"rank{rank}.pt", weights_only=True)


def load_client(path: Path) -> dict[str, Any]:
    return json.loads((path / "client.json").read_text())


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG states for a checkpoint: the CPU generator, and the accelerator's (where dropout draws on
    a GPU) when the model runs on one."""
    state = {"torch_rng": torch.get_rng_state()}
    if device.type != "cpu":
        import deepspeed

        state["device_rng"] = deepspeed.get_accelerator().get_rng_state(device.index).cpu()
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch_rng"])
    if device.type != "cpu":
        import deepspeed

        if "device_rng" in state:
            deepspeed.get_accelerator().set_rng_state(state["device_rng"], device.index)
        else:  # saved on the CPU: the run goes on, its dropout masks differ from an uninterrupted run's
            log.warning("the checkpoint holds no %s RNG state (saved on the CPU): dropout is not resumed exactly",
                        device.type)


def load_engine_state(engine, optimizer, path: Path, out_dir: Path, saved_world: int, rank: int,
                      strict: bool) -> None:
    """Model and optimizer state into the engine: DeepSpeed's own files at the same world size, else its universal
    checkpoint (converted here by rank 0, once) that any world size can load. `strict=False` for LoRA, whose
    checkpoints hold the trained parameters only (the base came from model.pretrained)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    if saved_world == world:
        engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                               load_lr_scheduler_states=True, load_module_strict=strict)
        return
    universal = out_dir / "universal"
    if rank == 0 and not (universal / path.name / COMPLETE).exists():
        to_universal(path, universal / path.name)
    dist.barrier()
    engine.load_checkpoint(str(universal), tag=path.name, load_optimizer_states=True,
                           load_lr_scheduler_states=True, load_module_strict=strict)
    # DeepSpeed 0.19.8's ZeRO-3 universal load gives every sub-group the *same* `step` tensor; torch's AdamW
    # increments it in place once per sub-group, so later sub-groups would step their bias correction ahead. One
    # tensor each (tests check the first resumed step exactly).
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def to_universal(tag: Path, out: Path) -> None:
    """DeepSpeed's universal checkpoint of `tag` (any world size can load it), written to `out`, marked complete."""
    import subprocess

    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                    "--output_folder", str(out)], check=True, capture_output=True)
    atomic_write(out / COMPLETE, b"")


def resolve(path: Path) -> Path:
    """A tag directory, or a run's out_dir / checkpoints dir (its newest complete tag)."""
    for candidate in (path, path / "checkpoints"):
        if (candidate / COMPLETE).exists():
            return candidate
        if (tag := latest(candidate)) is not None:
            return tag
    raise RunConfigError(f"{path}: no complete checkpoint here (a tag directory with {COMPLETE}, or a run directory "
                         "holding checkpoints/)")


def run_dir(tag: Path) -> Path:
    """The run directory a tag belongs to (OUT of OUT/checkpoints/TAG): its config.json is the run's."""
    return tag.parent.parent


def consolidated_state(tag: Path) -> dict[str, Any]:
    """The fp32 weights of a ZeRO checkpoint, lazily gathered (DeepSpeed's zero_to_fp32 lazy mode: each tensor
    is assembled from the memory-mapped partitions when `.contiguous()` is called on it)."""
    # Its progress lines and DeepSpeed's import-time warnings (its logger binds the stdout of the moment it is first
    # imported) go to stderr: stdout stays the caller's (evaluate --json).
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, lazy_mode=True)
