"""Which lines are processed, in which order and split, and by which processes: results come back in processing
order, so the shards do not depend on `--workers`."""
from __future__ import annotations

import multiprocessing
import signal
from pathlib import Path
from typing import Iterator

import numpy as np

from .samples import BuildSpec, Result, init_worker, process_line

Job = tuple[int, str, bytes]  # (line number, split, raw line)


def split_jobs(path: Path, seed: int, val_fraction: float, val_every: int) -> list[Job]:
    """The non-blank lines in processing order: shuffled by `seed`, then every position assigned a split (the first
    round(val_fraction·N) positions, or every val_every-th, go to "val")."""
    lines = [(n, text) for n, text in enumerate(path.read_bytes().splitlines(), start=1) if text.strip()]
    order = np.random.default_rng(seed).permutation(len(lines))
    num_val = round(val_fraction * len(lines))

    def split(position: int) -> str:
        if position < num_val or (val_every and position % val_every == val_every - 1):
            return "val"
        return "train"

    return [(lines[i][0], split(p), lines[i][1]) for p, i in enumerate(order)]


def run_jobs(spec: BuildSpec, jobs: list[Job], workers: int) -> Iterator[Result]:
    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            init_worker(spec)
            yield from map(process_line, jobs)
        finally:
            torch.set_num_threads(threads)  # init_worker may have changed it for this (the caller's) process
        return
    # spawn: forking a process that already runs torch threads can deadlock. The workers start with SIGINT ignored
    # (a spawned Python keeps an inherited SIG_IGN), so Ctrl-C interrupts only this process, which cleans up;
    # leaving the `with` (also when the consumer closes this generator early) terminates the workers.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(spec,))
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        yield from pool.imap(process_line, jobs, chunksize=8)
