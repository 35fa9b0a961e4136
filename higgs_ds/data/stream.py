"""Training stream: shards → TokenizedSamples → token-budget batches → collated `Batch`es (DESIGN §6).

Every epoch has a plan, computed identically on every rank from the manifest alone (no collective needed):
  1. shard order: a permutation seeded by (seed, epoch);
  2. shards → slots, one slot per (rank r, DataLoader worker w), slot = r·W + w: largest shard first (ties in
     permuted order) to the slot with the fewest expanded tokens so far; each slot reads its shards in permuted
     order;
  3. per slot: its samples, in read order, pass a shuffle buffer (simulated on sample ids, seeded by
     (seed, epoch, slot)) and are cut into batches by the budget (`Budget`);
  4. every slot keeps its first n batches, n = the minimum over all slots, so every rank yields W·n batches.
     The remainder (samples of later batches) is dropped for that epoch and counted in `stats()`, as are samples
     that alone exceed the budget.
Workers then read their shards (webdataset's tar reader) and emit exactly the planned batches. A corrupt or
missing sample leaves its batch one sample short; a batch left with no good sample becomes a blank batch (one
pad token, no labels: it adds nothing to the loss) so that every rank still takes the same number of steps.
Problems travel with the batches to the main process, where `stats()` counts them and they are logged.

DataLoader takes batch j of a rank from worker j mod W, so the number of batches delivered is the whole
position: resuming at k, worker i plays slot (i + k) mod W and skips that slot's batches before k.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch import IGNORE, Batch
from .collator import first_fit_decreasing, round_up
from .sample import TokenizedSample
from .shards import Manifest, ShardError, check_fingerprint, decode_sample, read_shard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """What one batch may hold: either `max_tokens` positions of the collated tensor (padded: rows × longest
    sample rounded up to `round_to`; packed: rows × `pack_length` rounded up to `round_to`, rows as the
    collator's first-fit-decreasing packs them) or a fixed `batch_size` samples."""

    max_tokens: int | None = None
    batch_size: int | None = None
    layout: str = "padded"
    round_to: int = 1
    pack_length: int | None = None

    def __post_init__(self):
        if (self.max_tokens is None) == (self.batch_size is None):
            raise ValueError(f"give exactly one of max_tokens / batch_size (got {self.max_tokens}, {self.batch_size})")
        if (self.max_tokens or 1) < 1 or (self.batch_size or 1) < 1:
            raise ValueError("max_tokens / batch_size must be positive")
        if self.layout == "packed" and self.max_tokens is not None and self.max_tokens < self.row_width:
            raise ValueError(f"max_tokens={self.max_tokens} is less than one packed row ({self.row_width})")

    @property
    def row_width(self) -> int:
        """Widest row the collator can produce in the packed layout."""
        return round_up(self.pack_length, self.round_to)

    def fits_alone(self, length: int) -> bool:
        if self.layout == "packed":
            return length <= self.pack_length
        return self.max_tokens is None or round_up(length, self.round_to) <= self.max_tokens

    def cut(self, lengths: np.ndarray) -> tuple[list[np.ndarray], int]:
        """Consecutive batches (index arrays into `lengths`) and the number of samples left out as too long."""
        batches, current, too_long = [], [], 0
        rows = _PackedRows(self.pack_length) if self.layout == "packed" else None
        longest = 0
        for i, length in enumerate(lengths.tolist()):
            if not self.fits_alone(length):
                too_long += 1
                continue
            if current and not self._room(len(current), longest, length, rows):
                batches.append(np.array(current))
                current, longest = [], 0
                rows = _PackedRows(self.pack_length) if rows is not None else None
            current.append(i)
            longest = max(longest, length)
            if rows is not None:
                rows.add(length)
        if current:
            batches.append(np.array(current))
        return batches, too_long

    def _room(self, count: int, longest: int, length: int, rows: "_PackedRows | None") -> bool:
        if self.batch_size is not None:
            return count < self.batch_size
        if rows is not None:
            return rows.fit(length, self.max_tokens // self.row_width)
        return (count + 1) * round_up(max(longest, length), self.round_to) <= self.max_tokens


class _PackedRows:
    """Rows the collator's first-fit-decreasing packing would use (Collator._pack), computed exactly only near
    the limit: any first-fit packing has at most one row no more than half full, so rows <= 2·total/P + 1."""

    def __init__(self, pack_length: int):
        self.pack_length, self.lengths, self.total = pack_length, [], 0

    def add(self, length: int) -> None:
        self.lengths.append(length)
        self.total += length

    def fit(self, length: int, max_rows: int) -> bool:
        """Whether the samples so far plus one of `length` pack into at most `max_rows` rows."""
        total = self.total + length
        if 2 * total // self.pack_length + 1 <= max_rows:
            return True
        if -(-total // self.pack_length) > max_rows:
            return False
        return len(first_fit_decreasing(np.array(self.lengths + [length]), self.pack_length)) <= max_rows


@dataclass
class SlotPlan:
    shards: list[int]  # manifest shard indices, in read order
    samples: np.ndarray  # global sample ids (shard offset + position in shard) of the kept batches, in order
    bounds: np.ndarray  # batch b is samples[bounds[b]:bounds[b + 1]]


@dataclass
class EpochPlan:
    epoch: int
    slots: list[SlotPlan]
    batches_per_slot: int
    too_long: int  # samples that alone exceed the budget
    dropped: int  # samples of batches past the common batch count (the remainder)


def shuffle_buffer(items: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a streaming shuffle buffer of `size` emits `items` in: once full, it emits a random element
    after each read; at the end it drains in random order. Memory of the real stream stays O(size)."""
    draws = rng.random(len(items)).tolist()
    buffer, out = [], []
    for item, draw in zip(items.tolist(), draws):
        buffer.append(item)
        if len(buffer) >= size:
            j = int(draw * len(buffer))
            buffer[j], buffer[-1] = buffer[-1], buffer[j]
            out.append(buffer.pop())
    out.extend(rng.permutation(np.array(buffer, dtype=np.int64)).tolist())
    return np.array(out, dtype=np.int64)


def plan_epoch(lengths: list[np.ndarray], epoch: int, seed: int, num_slots: int, budget: Budget,
               shuffle: bool = True, buffer_size: int = 1000) -> EpochPlan:
    """The deterministic plan described in the module docstring; `lengths[i]` = expanded lengths of shard i."""
    if len(lengths) < num_slots:
        raise ValueError(f"{len(lengths)} shards cannot feed {num_slots} rank×worker slots: rebuild with smaller "
                         "shards or use fewer DataLoader workers")
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    tokens = [int(lengths[shard].sum()) for shard in order]
    load, assigned = np.zeros(num_slots, dtype=np.int64), [[] for _ in range(num_slots)]
    for rank_in_order in sorted(range(len(order)), key=lambda i: -tokens[i]):  # stable: ties in permuted order
        slot = int(np.argmin(load))
        assigned[slot].append(rank_in_order)
        load[slot] += tokens[rank_in_order]
    offsets = np.cumsum([0] + [len(x) for x in lengths])
    all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    cuts, too_long = [], 0
    for slot in range(num_slots):
        shards = [int(order[i]) for i in sorted(assigned[slot])]
        read = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in shards] + [np.zeros(0, np.int64)])
        if shuffle:
            read = shuffle_buffer(read, buffer_size, np.random.default_rng([seed, epoch, slot]))
        batches, slot_too_long = budget.cut(all_lengths[read])
        cuts.append((shards, read, batches))
        too_long += slot_too_long
    per_slot = min(len(batches) for _, _, batches in cuts)
    if per_slot == 0:
        raise ValueError(f"epoch {epoch}: a rank×worker slot gets no batch ({num_slots} slots, {len(lengths)} "
                         "shards): too little data for this many ranks and workers at this budget")
    slots, dropped = [], 0
    for shards, read, batches in cuts:
        kept = batches[:per_slot]
        dropped += sum(len(b) for b in batches[per_slot:])
        bounds = np.cumsum([0] + [len(b) for b in kept])
        slots.append(SlotPlan(shards, read[np.concatenate(kept)], bounds))
    return EpochPlan(epoch, slots, per_slot, too_long, dropped)


def _blank(pad: int) -> TokenizedSample:
    return TokenizedSample("<blank>", np.array([pad], dtype=np.int32), np.array([IGNORE], dtype=np.int32))


class _Report:
    """Problems seen in a worker since its last batch; sent along with the next batch."""

    def __init__(self):
        self.counts, self.messages = Counter(), []

    def add(self, kind: str, count: int, message: str) -> None:
        self.counts[kind] += count
        self.messages.append(message)

    def take(self) -> dict[str, Any]:
        out = {"counts": dict(self.counts), "messages": self.messages}
        self.counts, self.messages = Counter(), []
        return out


class _RankEpoch(IterableDataset):
    """One rank's share of one epoch from `start` on; each DataLoader worker runs one slot."""

    def __init__(self, loader: "ShardLoader", plan: EpochPlan, start: int):
        self.paths = [loader.manifest.shard_path(s) for s in loader.manifest.shards]
        self.infos = loader.manifest.shards
        self.offsets, self.lengths = loader.offsets, loader.all_lengths
        self.collator, self.tokens, self.audio = loader.collator, loader.manifest.tokens, loader.manifest.audio
        self.vocab_size = loader.manifest.vocab_size
        workers = loader.workers
        self.slots = plan.slots[loader.rank * workers:(loader.rank + 1) * workers]
        self.per_slot, self.start = plan.batches_per_slot, start

    def __iter__(self) -> Iterator[tuple[Batch, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.slots):
            raise RuntimeError(f"planned for {len(self.slots)} DataLoader workers, running with {workers}")
        local = (worker + self.start) % workers
        done = max(0, -(-(self.start - local) // workers))  # batches j < start with j mod W == local
        yield from self._run(self.slots[local], done)

    def _run(self, slot: SlotPlan, first: int) -> Iterator[tuple[Batch, dict[str, Any]]]:
        report = _Report()
        batches = [slot.samples[slot.bounds[b]:slot.bounds[b + 1]] for b in range(first, self.per_slot)]
        if not batches:
            return
        wanted = np.concatenate(batches)
        shard_of = np.searchsorted(self.offsets, wanted, side="right") - 1
        read_base = np.full(len(self.paths), -1, dtype=np.int64)
        read_base[slot.shards] = np.cumsum([0] + [self.infos[s].samples for s in slot.shards])[:-1]
        read_index = read_base[shard_of] + wanted - self.offsets[shard_of]
        ready_at = [int(x.max()) for x in np.split(read_index, np.cumsum([len(b) for b in batches])[:-1])]
        wanted_by_shard: dict[int, set[int]] = {}
        for sid, shard in zip(wanted.tolist(), shard_of.tolist()):
            wanted_by_shard.setdefault(shard, set()).add(sid)
        got: dict[int, TokenizedSample] = {}
        emitted = 0

        def flush(upto: int):
            nonlocal emitted
            while emitted < len(batches) and ready_at[emitted] <= upto:
                samples = [got.pop(sid) for sid in batches[emitted].tolist() if sid in got]
                batch = None
                try:
                    batch = self.collator(samples) if samples else None
                except ValueError as exc:  # decode_sample validated every sample; this is a backstop
                    report.add("corrupt_samples", len(samples), f"collator rejected a batch: {exc}")
                if batch is None:
                    report.add("blank_batches", 1, "a batch lost every sample: sending a blank batch instead")
                    batch = self.collator([_blank(self.tokens.pad)])
                yield batch, report.take()
                emitted += 1

        for shard in slot.shards:
            todo = wanted_by_shard.get(shard, set())
            if todo:
                yield from self._read_shard(shard, todo, got, report, lambda pos: flush(read_base[shard] + pos))
                if todo:
                    report.add("missing_samples", len(todo), f"{self.infos[shard].name}: {len(todo)} planned "
                                                             "samples never arrived (truncated or damaged tar)")
            yield from flush(int(read_base[shard]) + self.infos[shard].samples - 1)
            if emitted == len(batches):
                return

    def _read_shard(self, shard: int, todo: set[int], got: dict, report: _Report, flush) -> Iterator:
        """Decode the wanted samples of one shard into `got` (removing them from `todo` as they arrive)."""
        path, info, offset = self.paths[shard], self.infos[shard], int(self.offsets[shard])
        if path.exists() and path.stat().st_size != info.bytes:
            report.add("bad_shards", 1, f"{info.name}: {path.stat().st_size} bytes on disk, manifest says "
                                        f"{info.bytes} (truncated or replaced)")
        try:
            for raw in read_shard(path):
                key = raw["__key__"]
                pos = int(key) if key.isdigit() else -1
                if not 0 <= pos < info.samples:
                    report.add("corrupt_samples", 1, f"{info.name}: unexpected tar key {key!r}")
                    continue
                sid = offset + pos
                if sid in todo:
                    todo.discard(sid)
                    try:
                        sample = decode_sample(raw, self.tokens, self.audio, self.vocab_size)
                        length = sample.num_expanded_tokens(self.audio)
                        if length != self.lengths[sid]:
                            raise ShardError(f"{info.name}: key {key!r}: {length} expanded tokens, the lengths "
                                             f"sidecar says {self.lengths[sid]}")
                        got[sid] = sample
                    except ShardError as exc:
                        report.add("corrupt_samples", 1, str(exc))
                yield from flush(pos)
        except (ShardError, OSError) as exc:
            report.add("bad_shards", 1, str(exc))


def _identity(item):
    return item


class ShardLoader:
    """Iterates one split as collated `Batch`es, one epoch per `for` loop, resumable mid-epoch.

    split_dir: a split directory with manifest.json (data_tools.build_shards). rank/world_size default to
    torch.distributed's (or 0/1). Exactly one of max_tokens (the default for training) and batch_size.
    fingerprint: the trainer's `data_fingerprint(...)`; shards built for another tokenizer/config are refused.
    """

    def __init__(self, split_dir: str | Path, collator, *, rank: int | None = None, world_size: int | None = None,
                 num_workers: int = 0, seed: int = 0, max_tokens: int | None = None, batch_size: int | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 1000, fingerprint: Mapping[str, Any] | None = None):
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        self.world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if distributed else 1)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        self.manifest = Manifest.load(split_dir)
        if fingerprint is not None:
            check_fingerprint(self.manifest, fingerprint)
        if collator.tokens != self.manifest.tokens or collator.audio != self.manifest.audio:
            raise ValueError(f"{self.manifest.path}: the collator's special tokens/audio settings differ from the "
                             "shards' (built for another tokenizer or model config)")
        self.collator, self.num_workers, self.workers = collator, num_workers, max(1, num_workers)
        self.seed, self.shuffle, self.shuffle_buffer = seed, shuffle, shuffle_buffer
        self.budget = Budget(max_tokens, batch_size, collator.layout, collator.round_to, collator.pack_length)
        lengths = [self.manifest.lengths(s) for s in self.manifest.shards]
        self.offsets = np.cumsum([0] + [len(x) for x in lengths])
        self.all_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
        self._lengths = lengths
        self.shards_digest = hashlib.sha256(json.dumps(
            [[s.name, s.sha256, s.samples] for s in self.manifest.shards]).encode()).hexdigest()[:16]
        self.epoch, self.position = 0, 0
        self._plan: EpochPlan | None = None
        self._counts: Counter = Counter()
        self.plan(0)  # fail now, not at the first step, when the data cannot feed every slot

    def plan(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = plan_epoch(self._lengths, epoch, self.seed, self.world_size * self.workers, self.budget,
                                    self.shuffle, self.shuffle_buffer)
        return self._plan

    def __len__(self) -> int:
        """Batches per epoch on this rank: the same on every rank."""
        return self.plan(self.epoch).batches_per_slot * self.workers

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        plan = self.plan(self.epoch)
        if self.position < len(self):
            loader = DataLoader(_RankEpoch(self, plan, self.position), batch_size=None, collate_fn=_identity,
                                num_workers=self.num_workers)
            for batch, report in loader:
                self._counts.update(report["counts"])
                for message in report["messages"]:
                    log.warning("rank %d epoch %d: %s", self.rank, self.epoch, message)
                self.position += 1
                yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def stats(self) -> dict[str, int]:
        """Counts for the trainer: problems since construction (restored with the state) and this epoch's plan."""
        plan = self.plan(self.epoch)
        return {"epoch": self.epoch, "position": self.position, "batches_per_epoch": len(self),
                "too_long_samples": plan.too_long, "dropped_samples": plan.dropped,
                **{k: self._counts.get(k, 0) for k in ("corrupt_samples", "missing_samples", "bad_shards",
                                                       "blank_batches")}}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size,
                "num_workers": self.workers, "shards": self.shards_digest, "counts": dict(self._counts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = {"world_size": self.world_size, "num_workers": self.workers, "shards": self.shards_digest}
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            raise ValueError(f"cannot resume the stream exactly: saved vs current {differ} (the epoch plan depends "
                             "on them)")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._plan, self._counts = None, Counter(state.get("counts", {}))
