"""Training stream: shards → TokenizedSamples → token-budget batches → collated `Batch`es (docs/design.md §7).

Every epoch has a plan (plan.py): each rank × DataLoader-worker slot reads a contiguous piece of the epoch's
shard order, shuffled through a buffer and cut into batches, and every slot yields the same number of batches.
Workers read their pieces (`shard_entries`: tar members grouped into samples) and emit exactly the planned
batches. A corrupt or missing sample leaves its batch one sample short; a batch left with no good sample becomes a
blank batch (one pad token, no labels: it adds nothing to the loss) so that every rank still takes the same number
of steps. Problems travel with the batches to the main process, where `stats()` counts them and they are logged.
Per rank and epoch the counts add up: planned = seen + corrupt + missing + dropped + too_long.

DataLoader takes batch j of a rank from worker j mod W, so the number of batches delivered is the whole
position: resuming at k, worker i plays slot (i + k) mod W and skips that slot's batches before k.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import IGNORE, Batch
from .packing import ceil_div
from .plan import AgreeMin, Budget, EpochPlan, Piece, ShardLengths, SlotPlan, plan_epoch
from .sample import TokenizedSample
from .shards import Manifest, ShardError, Stray, check_fingerprint, decode_sample, is_remote, shard_entries, tar_problem

log = logging.getLogger(__name__)

COUNTERS = ("planned_samples", "seen_samples", "corrupt_samples", "missing_samples", "dropped_samples",
            "too_long_samples", "stray_members", "bad_shards", "blank_batches", "padding_batches")


def _blank(pad: int) -> TokenizedSample:
    return TokenizedSample("<blank>", np.array([pad], dtype=np.int32), np.array([IGNORE], dtype=np.int32))


class _Report:
    """Problems seen in a worker since its last batch; sent along with the next batch."""

    def __init__(self):
        self.counts, self.messages = Counter(), []

    def add(self, kind: str, count: int, message: str | None = None) -> None:
        self.counts[kind] += count
        if message is not None:
            self.messages.append(message)

    def take(self) -> dict[str, Any]:
        out = {"counts": dict(self.counts), "messages": self.messages}
        self.counts, self.messages = Counter(), []
        return out


class _SplitFiles:
    """What a worker needs to read and check one split's shards (picklable)."""

    def __init__(self, manifest: Manifest, lengths: ShardLengths):
        self.paths = [manifest.shard_path(s) for s in manifest.shards]
        self.infos, self.lengths = manifest.shards, lengths
        self.tokens, self.audio, self.vocab_size = manifest.tokens, manifest.audio, manifest.vocab_size


class SlotReader:
    """One slot's planned batches from batch `first` on. Reads the slot's pieces in order, decodes the samples it
    wants, and emits each batch once every sample of it is resolved: arrived, corrupt, or missing when its piece
    ended. Tar members are grouped into samples by `shard_entries` (the grouping `shard_tools validate` uses);
    members that belong to no sample are strays, counted apart from the samples."""

    def __init__(self, files: _SplitFiles, collator, slot: SlotPlan, first: int):
        self.files, self.collator, self.slot = files, collator, slot
        self.batches = [slot.batch(b) for b in range(first, len(slot.bounds) - 1)]
        self.batch_of = {sid: b for b, ids in enumerate(self.batches) for sid in ids.tolist()}
        self.unresolved = [len(ids) for ids in self.batches]
        self.got: dict[int, TokenizedSample] = {}
        self.emitted = 0
        self.report = _Report()

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        yield from self._flush()
        for piece in self.slot.pieces:
            if self.emitted == len(self.batches):
                return
            offset = int(self.files.lengths.offsets[piece.shard])
            todo = {sid for sid in range(offset + piece.start, offset + piece.end) if sid in self.batch_of}
            if todo:
                yield from self._read(piece, todo)
        yield from self._flush()

    def _resolve(self, sid: int) -> None:
        self.unresolved[self.batch_of[sid]] -= 1

    def _flush(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        while self.emitted < len(self.batches) and self.unresolved[self.emitted] == 0:
            planned = self.batches[self.emitted].tolist()
            samples = [self.got.pop(sid) for sid in planned if sid in self.got]
            batch = None
            try:
                batch = self.collator(samples) if samples else None
            except ValueError as exc:  # every sample was validated at decode; this is a backstop
                self.report.add("corrupt_samples", len(samples), f"collator rejected a batch: {exc}")
                samples = []
            if batch is None:
                if planned:
                    self.report.add("blank_batches", 1, "a batch lost every sample: sending a blank batch instead")
                else:
                    self.report.add("padding_batches", 1)  # the epoch's last batches of a shorter slot
                batch = self.collator([_blank(self.files.tokens.pad)])
            self.report.add("seen_samples", len(samples))
            yield batch, self.report.take()
            self.emitted += 1

    def _read(self, piece: Piece, todo: set[int]) -> Iterator[tuple[Batch, dict[str, Any]]]:
        files, report = self.files, self.report
        path, info = files.paths[piece.shard], files.infos[piece.shard]
        offset = int(files.lengths.offsets[piece.shard])
        # Every slot reading a shard meets its problems; the slot whose piece starts the shard reports them, once.
        first = piece.start == 0
        counted = first and self._check_shard(path, info)
        failed = None
        try:
            for entry in shard_entries(path, info.samples):
                if isinstance(entry, Stray):
                    if first:
                        report.add("stray_members", len(entry.names), f"{info.name}: {entry}")
                    continue
                pos = int(entry["__key__"])
                sid = offset + pos
                if sid not in todo:  # another slot's sample
                    continue
                todo.discard(sid)
                try:
                    sample = decode_sample(entry, files.tokens, files.audio, files.vocab_size)
                    length = sample.num_expanded_tokens(files.audio)
                    if length != files.lengths.of(piece.shard)[pos]:
                        raise ShardError(f"{info.name}: key {entry['__key__']!r}: {length} expanded tokens, the "
                                         f"lengths sidecar says {files.lengths.of(piece.shard)[pos]}")
                    self.got[sid] = sample
                except ShardError as exc:
                    report.add("corrupt_samples", 1, str(exc))
                self._resolve(sid)
                yield from self._flush()
                if not todo:  # the rest of the shard belongs to other slots
                    break
        except (ShardError, OSError) as exc:
            failed = str(exc)
            if first and not counted:
                report.add("bad_shards", 1, failed)
        if todo:
            why = failed if failed is not None else "the tar ends before them"
            report.add("missing_samples", len(todo), f"{info.name}: {len(todo)} planned samples never arrived "
                                                     f"({why})")
            for sid in todo:
                self._resolve(sid)
        yield from self._flush()

    def _check_shard(self, path, info) -> bool:
        """Counts a local shard that is not the file the manifest describes (missing, a directory, another size) as
        one bad shard; True when it did. Cheap: a stat. A shard damaged in place (same size) or a remote one is
        counted when this slot's reading meets the damage."""
        if is_remote(path):
            return False
        try:
            if not path.is_file():
                problem = "a directory, not a shard file" if path.is_dir() else "missing"
            elif path.stat().st_size != info.bytes:
                problem = (f"{path.stat().st_size} bytes on disk, manifest says {info.bytes} "
                           f"({tar_problem(path) or 'replaced'})")
            else:
                problem = None
        except OSError as exc:
            problem = f"unreadable ({exc})"
        if problem is not None:
            self.report.add("bad_shards", 1, f"{info.name}: {problem}")
        return problem is not None


class _RankEpoch(IterableDataset):
    """One rank's share of one epoch from `start` on; each DataLoader worker runs one slot."""

    def __init__(self, files: _SplitFiles, collator, slots: list[SlotPlan], start: int):
        self.files, self.collator, self.slots, self.start = files, collator, slots, start

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.slots):
            raise RuntimeError(f"planned for {len(self.slots)} DataLoader workers, running with {workers}")
        local = (worker + self.start) % workers
        yield from SlotReader(self.files, self.collator, self.slots[local], _batches_before(self.start, local,
                                                                                             workers))


def _batches_before(position: int, local: int, workers: int) -> int:
    """Batches j < position with j mod W == local: what slot `local` of a rank has delivered at `position`."""
    return max(0, ceil_div(position - local, workers))


def all_reduce_min(value: int) -> int:
    """The minimum over every process of the default group (the stream's `agree_min` in training)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    out = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return int(out.item())


class ShardLoader:
    """Iterates one split as collated `Batch`es, one epoch per `for` loop, resumable mid-epoch.

    split_dir: a split directory with manifest.json (data_tools.build_shards). rank/world_size default to
    torch.distributed's (or 0/1). Exactly one of max_tokens (the default for training) and batch_size.
    fingerprint: the trainer's `data_fingerprint(...)`; shards built for another tokenizer/config are refused.
    num_epochs: when known, the last epoch drops nothing (shorter slots end with blank batches).
    agree_min: how the ranks agree on the epoch's batch count; default `all_reduce_min` when torch.distributed is
    initialised with several ranks — then planning an epoch (construction, the first `len()`/`for` of an epoch,
    `load_state_dict`) is a collective every rank must reach — else every slot is planned here.
    """

    def __init__(self, split_dir: str | Path, collator, *, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, max_tokens: int | None = None, batch_size: int | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 1000, fingerprint: Mapping[str, Any] | None = None,
                 num_epochs: int | None = None, agree_min: AgreeMin | None = None):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        if agree_min is None and distributed and self.world_size > 1:
            agree_min = all_reduce_min
        self.agree_min = agree_min
        self.manifest = Manifest.load(split_dir)
        if fingerprint is not None:
            check_fingerprint(self.manifest, fingerprint)
        if collator.tokens != self.manifest.tokens or collator.audio != self.manifest.audio:
            raise ValueError(f"{self.manifest.path}: the collator's special tokens/audio settings differ from the "
                             "shards' (built for another tokenizer or model config)")
        self.collator, self.num_workers, self.workers = collator, num_workers, max(1, num_workers)
        self.seed, self.shuffle, self.shuffle_buffer, self.num_epochs = seed, shuffle, shuffle_buffer, num_epochs
        self.budget = Budget(max_tokens, batch_size, collator.layout, collator.round_to, collator.pack_length)
        self.lengths = ShardLengths([s.samples for s in self.manifest.shards],
                                    [s.expanded_tokens for s in self.manifest.shards],
                                    functools.partial(_shard_lengths, self.manifest))
        self.files = _SplitFiles(self.manifest, self.lengths)
        self.shards_digest = hashlib.sha256(json.dumps(
            [[s.name, s.sha256, s.samples] for s in self.manifest.shards]).encode()).hexdigest()[:16]
        self.epoch, self.position = 0, 0
        self._excluded: tuple[int, np.ndarray] | None = None  # (epoch, samples consumed before a re-plan)
        self._plan: EpochPlan | None = None
        self._counts: Counter = Counter()
        self.plan(0)  # fail now, not at the first step, when the data cannot feed every slot

    @property
    def my_slots(self) -> list[int]:
        return list(range(self.rank * self.workers, (self.rank + 1) * self.workers))

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            last = self.num_epochs is not None and epoch == self.num_epochs - 1
            self._plan = plan_epoch(self.lengths, epoch, self.seed, self.world_size * self.workers, self.budget,
                                    self.shuffle, self.shuffle_buffer,
                                    slots=self.my_slots if self.agree_min is not None else None, last=last,
                                    agree_min=self.agree_min, exclude=self._excluded_in(epoch))
        return self._plan

    def __len__(self) -> int:
        """Batches per epoch on this rank: the same on every rank."""
        return self.batches_in(self.epoch)

    def batches_in(self, epoch: int) -> int:
        """Batches epoch `epoch` gives this rank (every rank alike); plans it (a collective in training)."""
        return self._batches(self.plan(epoch))

    def _batches(self, plan: EpochPlan) -> int:
        return plan.batches_per_slot * self.workers

    def batches_left(self, num_epochs: int) -> int:
        """Batches this rank still delivers from where it stands through epoch `num_epochs - 1`."""
        if self.epoch >= num_epochs:
            return 0
        return len(self) - self.position + sum(self.batches_in(e) for e in range(self.epoch + 1, num_epochs))

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan(self.epoch)
        if self.position == 0:
            slots = [plan.slots[s] for s in self.my_slots]
            self._counts.update(planned_samples=sum(s.planned for s in slots),
                                dropped_samples=sum(s.dropped for s in slots),
                                too_long_samples=sum(s.too_long for s in slots))
        if self.position < len(self):
            rank_epoch = _RankEpoch(self.files, self.collator, [plan.slots[s] for s in self.my_slots],
                                    self.position)
            # A generator of its own: DataLoader would otherwise draw its workers' base seed from the global RNG on
            # every iter(), so a run resumed mid-epoch would see other dropout masks than an uninterrupted one.
            loader = DataLoader(rank_epoch, batch_size=None, collate_fn=_identity, num_workers=self.num_workers,
                                generator=torch.Generator().manual_seed(self.seed),
                                multiprocessing_context=worker_context() if self.num_workers else None,
                                worker_init_fn=functools.partial(_exit_with, os.getpid()) if self.num_workers else None)
            for batch, report in loader:
                self._counts.update(report["counts"])
                for message in report["messages"]:
                    log.warning("rank %d epoch %d: %s", self.rank, self.epoch, message)
                self.position += 1
                yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def stats(self) -> dict[str, int]:
        """Counts since construction (restored with the state), every epoch's plan counted when it starts: after
        an epoch, planned = seen + corrupt + missing + dropped + too_long (this rank's). Never plans."""
        batches = self._batches(self._plan) if self._plan is not None else 0
        return {"epoch": self.epoch, "position": self.position, "batches_per_epoch": batches,
                **{k: self._counts.get(k, 0) for k in COUNTERS}}

    def consumed(self) -> dict[int, list[int]]:
        """Sample ids each of this rank's slots has delivered in the current epoch (by global slot index)."""
        if self.position == 0:
            return {s: [] for s in self.my_slots}
        plan = self.plan(self.epoch)
        out = {}
        for local, s in enumerate(self.my_slots):
            done = _batches_before(self.position, local, self.workers)
            out[s] = plan.slots[s].samples[:plan.slots[s].bounds[done]].tolist()
        return out

    def _excluded_in(self, epoch: int) -> np.ndarray | None:
        return self._excluded[1] if self._excluded is not None and self._excluded[0] == epoch else None

    def state_dict(self) -> dict[str, Any]:
        """JSON-able. `consumed`: this epoch's samples each of this rank's slots delivered; `excluded`: samples of
        this epoch consumed before a re-plan (a resume at another world size), the same on every rank. An epoch
        whose last batch has been taken is saved as the start of the next one: re-planned at another world size,
        a finished epoch would have no sample left to give the new slots."""
        finished = self.position and self.position >= len(self)
        epoch, position = (self.epoch + 1, 0) if finished else (self.epoch, self.position)
        excluded = self._excluded_in(epoch)
        consumed = self.consumed() if position else {}
        return {"epoch": epoch, "position": position, "seed": self.seed, "world_size": self.world_size,
                "num_workers": self.workers, "shards": self.shards_digest, "counts": dict(self._counts),
                "consumed": {str(s): ids for s, ids in consumed.items()},
                "excluded": excluded.tolist() if excluded is not None else []}

    def load_state_dict(self, state: Mapping[str, Any], all_states: list[Mapping[str, Any]] | None = None) -> None:
        """Resume exactly where `state` (this rank's) left off. At another world size or worker count, pass every
        saved rank's state as `all_states`: the epoch continues with the samples no saved slot had consumed,
        re-planned over the current slots, none repeated (global batch = world × accumulation changes with it;
        problem counts restart)."""
        if state.get("shards") != self.shards_digest:
            raise ValueError(f"cannot resume the stream: the shards differ from the saved run's ({state.get('shards')}"
                             f" vs {self.shards_digest})")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        excluded = list(state.get("excluded", []))
        same = state.get("world_size") == self.world_size and state.get("num_workers") == self.workers
        if same:
            self.position, self._counts = int(state["position"]), Counter(state.get("counts", {}))
        else:
            if all_states is None or len(all_states) != state.get("world_size"):
                saved = f"{state.get('world_size')} ranks × {state.get('num_workers')}"
                raise ValueError(f"the saved stream ran on {saved}"
                                 f" workers, this one on {self.world_size} × {self.workers}: pass all "
                                 f"{state.get('world_size')} saved rank states to re-plan the rest of the epoch")
            if any(int(s["epoch"]) != self.epoch or int(s["seed"]) != self.seed for s in all_states):
                raise ValueError("the saved rank states disagree on epoch/seed")
            excluded += [sid for s in all_states for ids in s.get("consumed", {}).values() for sid in ids]
            self.position, self._counts = 0, Counter()
        self._excluded = (self.epoch, np.unique(np.array(excluded, dtype=np.int64))) if excluded else None
        self._plan = None


def worker_context():
    """The multiprocessing context of the DataLoader workers: a forkserver, so that no worker is fork()ed from the
    training process itself. That process has threads (DeepSpeed's and gloo's, TensorBoard's writer, the last
    epoch's queue feeders), and before CPython 3.11.8 (gh-112275) a child forked while another thread holds the
    interpreter's HEAD_LOCK hangs in PyOS_AfterFork_Child before it runs any of our code. Seen in this project's
    CI on rank 0 at an epoch boundary: the worker stuck there, the rank waiting for its batch, the other rank in
    the next all-reduce until gloo's 10-minute timeout. The server is a fresh single-threaded process (started
    once per process, by fork+exec); each epoch's workers fork from it.

    As with spawn, a worker re-imports the main script as `__mp_main__`: guard its work with
    `if __name__ == "__main__"`. The server preloads this module and the modules the main script's names come
    from, so that a worker imports nothing heavy itself."""
    import inspect
    import multiprocessing
    import sys

    main = vars(sys.modules.get("__main__", sys))
    used = {value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
            for value in main.values()}
    preload = [__name__, *sorted(name for name in used if isinstance(name, str) and name in sys.modules
                                 and name not in ("__main__", "builtins"))]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(preload)  # read once, when the server starts (the first epoch's workers)
    return context


def _exit_with(owner: int, worker_id: int) -> None:
    """A worker's watch on the process that iterates its DataLoader. torch's own watch compares the worker's
    parent pid, which for a forkserver's child is the server, and the server lives as long as any worker does
    (each holds its alive pipe): without this a worker outlived a SIGKILLed rank and held the job's output open."""
    import select
    import threading

    def watch():
        try:
            fd = os.pidfd_open(owner)  # readable once the owner has exited
            select.select([fd], [], [])
        except ProcessLookupError:
            pass  # already gone
        except OSError:  # no pidfd (Linux < 5.3): poll
            while _alive(owner):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-owner", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _identity(item):
    return item


def _shard_lengths(manifest: Manifest, shard: int) -> np.ndarray:
    return manifest.lengths(manifest.shards[shard])
