"""Crash-safe DeepSpeed checkpoints (docs/design.md §8): a tag counts only once it is marked complete.

    OUT/checkpoints/step00000100/      DeepSpeed's files (save_latest=False: no `latest` written in place)
                                       rank{r}.pt: that rank's stream state and RNG states (torch.load weights_only)
                                       client.json: step, config fingerprint, world size
                                       COMPLETE: written last, atomically, after every rank's files (barriers)
A crash at any point leaves the previous complete tag loadable; `resume=auto` takes the newest complete one. Older
complete tags beyond `keep_last` and every incomplete tag older than the newest complete are pruned afterwards."""
from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from ..data.shards import atomic_write

COMPLETE = "COMPLETE"


def tag_name(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(directory: Path) -> list[Path]:
    """Complete checkpoint tags, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and (p / COMPLETE).is_file())


def latest(directory: Path) -> Path | None:
    tags = complete_tags(directory)
    return tags[-1] if tags else None


def save(engine, directory: Path, step: int, rank_state: dict[str, Any], client: dict[str, Any], rank: int,
         keep_last: int, before_complete=None, adapters_only: bool = False) -> Path:
    """Every rank calls it. `rank_state` is this rank's (stream state, RNG); `client` is rank 0's. `adapters_only`
    (LoRA): the trained parameters and their optimizer state only, no frozen base weights."""
    import torch.distributed as dist

    tag = tag_name(step)
    path = directory / tag
    if rank == 0 and path.exists():  # a crashed earlier attempt at this step: start it over
        shutil.rmtree(path)
    dist.barrier()
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step}, save_latest=False,
                          exclude_frozen_parameters=adapters_only)
    torch.save(rank_state, path / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        if before_complete is not None:
            before_complete()  # test hook: a crash between the shards and the mark
        atomic_write(path / "client.json", json.dumps(client, indent=1, sort_keys=True).encode())
        atomic_write(path / COMPLETE, b"")
        _prune(directory, keep_last)
    dist.barrier()
    return path


def _prune(directory: Path, keep_last: int) -> None:
    complete = complete_tags(directory)
    newest = complete[-1]
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for p in directory.iterdir():
        if p.is_dir() and not (p / COMPLETE).exists() and p.name < newest.name:
            shutil.rmtree(p, ignore_errors=True)


def load_rank_state(path: Path, rank: int) -> dict[str, Any]:
    return torch.load(path / f"rank{rank}.pt", weights_only=True)


def load_client(path: Path) -> dict[str, Any]:
    return json.loads((path / "client.json").read_text())


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
    raise SystemExit(f"{path}: no complete checkpoint here (a tag directory with {COMPLETE}, or a run directory "
                     "holding checkpoints/)")


def run_config(tag: Path) -> dict[str, Any]:
    """The resolved run config the trainer wrote beside its checkpoints (OUT/config.json)."""
    return json.loads((tag.parent.parent / "config.json").read_text())


def consolidated_state(tag: Path) -> dict[str, Any]:
    """The fp32 weights of a ZeRO checkpoint, lazily gathered (DeepSpeed's zero_to_fp32 lazy mode: each tensor
    is assembled from the memory-mapped partitions when `.contiguous()` is called on it)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout stays the caller's (evaluate --json)
        return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name, lazy_mode=True)
