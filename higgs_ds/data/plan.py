"""The epoch plan: which samples each rank × worker slot reads, in which order and batches (docs/design.md §7).

Computed from the manifest and the lengths sidecars alone, identically wherever it runs:
  1. shard order: a permutation seeded by (seed, epoch); the shards' samples in that order form the epoch's
     read sequence;
  2. slots: slot s = r·W + w (rank r, DataLoader worker w) reads the s-th of S contiguous pieces of the read
     sequence, cut at equal shares of the total weight (expanded tokens, or samples for a batch_size budget),
     so slots differ by less than one sample's weight. A shard may be read by two neighbouring slots, and a
     dataset with fewer shards than slots still feeds every slot;
  3. per slot: its samples pass a shuffle buffer (simulated on sample ids, seeded by (seed, epoch, slot)) and
     are cut into batches by the `Budget`;
  4. the slots agree on one batch count n through `agree_min` (an all-reduce in training, a plain function
     when every slot is planned in one process). Usually n = the fewest batches of any slot, and the few samples
     of later batches are dropped for the epoch; in the last epoch n = the most, nothing is dropped, and shorter
     slots end with empty batches (the stream sends blank batches: one pad token, no labels).
A rank plans only its own slots (the cost is its share of the samples), except that without a collective it
plans them all to agree on n locally."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .packing import packed_end, padded_end, round_up

AgreeMin = Callable[[int], int]  # this process's value -> the minimum over every process


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

    def fits_alone(self, lengths: np.ndarray) -> np.ndarray:
        lengths = np.asarray(lengths, dtype=np.int64)
        if self.layout == "packed":
            return lengths <= self.pack_length
        if self.max_tokens is None:
            return np.ones(lengths.shape, dtype=bool)
        return round_up(lengths, self.round_to) <= self.max_tokens

    def cut(self, lengths: np.ndarray) -> tuple[list[np.ndarray], int]:
        """Consecutive batches (index arrays into `lengths`) and the number of samples left out as too long."""
        lengths = np.asarray(lengths, dtype=np.int64)
        kept = np.flatnonzero(self.fits_alone(lengths))
        fitting = lengths[kept]
        if self.batch_size is not None:
            ends = list(range(self.batch_size, len(kept), self.batch_size))
        else:
            ends, start = [], 0
            while start < len(fitting):
                if self.layout == "packed":
                    start = packed_end(fitting, start, self.pack_length, self.max_tokens // self.row_width)
                else:
                    start = padded_end(fitting, start, self.max_tokens, self.round_to)
                ends.append(start)
            ends = ends[:-1]
        return (np.split(kept, ends) if len(kept) else []), len(lengths) - len(kept)


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


class ShardLengths:
    """Per-shard sample counts and expanded-token totals, with each shard's per-sample lengths loaded only when
    a planned slot reads that shard (a rank touches its own share of the sidecars)."""

    def __init__(self, samples: Sequence[int], tokens: Sequence[int], load: Callable[[int], np.ndarray]):
        self.samples = np.asarray(samples, dtype=np.int64)
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.samples)])  # global sample id of each shard's first
        self._load, self._cache = load, {}

    @classmethod
    def from_arrays(cls, lengths: Sequence[np.ndarray]) -> "ShardLengths":
        return cls([len(x) for x in lengths], [int(np.sum(x, dtype=np.int64)) for x in lengths],
                   lambda shard: lengths[shard])

    def __len__(self) -> int:
        return len(self.samples)

    def of(self, shard: int) -> np.ndarray:
        if shard not in self._cache:
            self._cache[shard] = np.asarray(self._load(shard), dtype=np.int64)
        return self._cache[shard]


@dataclass
class Piece:
    shard: int  # manifest index
    start: int  # samples [start, end) of that shard, in tar order
    end: int


@dataclass
class SlotPlan:
    pieces: list[Piece]  # what the slot reads, in read order
    samples: np.ndarray  # global sample ids (shard offset + position in shard) of its batches, in batch order
    bounds: np.ndarray  # batch b is samples[bounds[b]:bounds[b + 1]]; an empty batch pads the epoch's end
    planned: int  # samples in its pieces = batched + dropped + too_long
    dropped: int  # samples of batches past the agreed count
    too_long: int  # samples that alone exceed the budget

    @property
    def shards(self) -> list[int]:
        return [p.shard for p in self.pieces]

    def batch(self, b: int) -> np.ndarray:
        return self.samples[self.bounds[b]:self.bounds[b + 1]]


@dataclass
class EpochPlan:
    epoch: int
    slots: dict[int, SlotPlan]  # the slots planned here, by global slot index
    batches_per_slot: int
    last: bool  # padded to the longest slot instead of trimmed to the shortest

    def total(self, name: str) -> int:
        """`planned`, `dropped` or `too_long` summed over the slots planned here."""
        return sum(getattr(slot, name) for slot in self.slots.values())


def plan_epoch(source: ShardLengths | Sequence[np.ndarray], epoch: int, seed: int, num_slots: int, budget: Budget,
               shuffle: bool = True, buffer_size: int = 1000, slots: Sequence[int] | None = None,
               last: bool = False, agree_min: AgreeMin | None = None,
               exclude: np.ndarray | None = None) -> EpochPlan:
    """The plan of the module docstring for `slots` (default: all). `agree_min` must be given when `slots` is not
    every slot (the other slots' batch counts are elsewhere); without it the planned slots agree among themselves.
    `exclude`: global sample ids already consumed this epoch (a run resumed at another world size): the rest of
    the epoch is planned over the new slots without them."""
    if not isinstance(source, ShardLengths):
        source = ShardLengths.from_arrays(source)
    every = list(range(num_slots))
    slots = every if slots is None else list(slots)
    if agree_min is None:
        if slots != every:
            raise ValueError("planning a subset of the slots needs agree_min (the others' batch counts)")
        agree_min = int
    order = np.random.default_rng([seed, epoch]).permutation(len(source)) if shuffle else np.arange(len(source))
    exclude = np.unique(np.asarray(exclude if exclude is not None else [], dtype=np.int64))

    def sample_weights(shard: int) -> np.ndarray:
        """Weights of a shard's samples in tar order; 0 for the excluded ones."""
        weights = np.ones(source.samples[shard], np.int64) if budget.batch_size is not None else source.of(shard)
        lo, hi = np.searchsorted(exclude, source.offsets[shard:shard + 2])
        if hi > lo:
            weights = weights.copy()
            weights[exclude[lo:hi] - source.offsets[shard]] = 0
        return weights

    weight = source.samples if budget.batch_size is not None else source.tokens
    if len(exclude):
        touched = np.unique(np.searchsorted(source.offsets, exclude, side="right") - 1)
        weight = weight.copy()
        weight[touched] = [int(sample_weights(int(shard)).sum()) for shard in touched]
    shard_end = np.cumsum(weight[order])  # cumulative weight at the end of each shard in read order
    total = int(shard_end[-1]) if len(shard_end) else 0
    read_offset = np.concatenate([[0], np.cumsum(source.samples[order])])  # read position of each shard's first

    def boundary(s: int) -> int:
        """Read position where slot s begins: the first sample starting at or after weight total·s/S."""
        target = total * s // num_slots
        p = int(np.searchsorted(shard_end, target, side="right"))
        if p == len(order) or s == 0:
            return 0 if s == 0 else int(read_offset[-1])
        before = int(shard_end[p - 1]) if p else 0
        weights = sample_weights(int(order[p]))
        starts = np.cumsum(weights) - weights
        return int(read_offset[p]) + int(np.searchsorted(starts, target - before, side="left"))

    cuts = {}
    for s in slots:
        begin, end = boundary(s), boundary(s + 1) if s + 1 < num_slots else int(read_offset[-1])
        pieces, ids, lengths = [], [], []
        first = int(np.searchsorted(read_offset, begin, side="right")) - 1
        for p in range(max(first, 0), len(order)):
            lo, hi = max(begin, int(read_offset[p])), min(end, int(read_offset[p + 1]))
            if lo >= hi:
                if read_offset[p] >= end:
                    break
                continue
            shard = int(order[p])
            piece = Piece(shard, lo - int(read_offset[p]), hi - int(read_offset[p]))
            pieces.append(piece)
            piece_ids = source.offsets[shard] + np.arange(piece.start, piece.end)
            keep = ~np.isin(piece_ids, exclude) if len(exclude) else slice(None)
            ids.append(piece_ids[keep])
            lengths.append(source.of(shard)[piece.start:piece.end][keep])
        read = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        slot_lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        if shuffle:
            permuted = shuffle_buffer(np.arange(len(read)), buffer_size, np.random.default_rng([seed, epoch, s]))
            read, slot_lengths = read[permuted], slot_lengths[permuted]
        batches, too_long = budget.cut(slot_lengths)
        cuts[s] = (pieces, read, batches, too_long)

    counts = [len(batches) for _, _, batches, _ in cuts.values()]
    per_slot = -agree_min(-max(counts)) if last else agree_min(min(counts))
    if per_slot == 0:
        raise ValueError(f"epoch {epoch}: {int(read_offset[-1])} samples in {len(source)} shards cannot give each of "
                         f"the {num_slots} rank×worker slots a batch at this budget: use fewer ranks or DataLoader "
                         "workers, or a smaller batch budget")
    planned = {}
    for s, (pieces, read, batches, too_long) in cuts.items():
        kept = batches[:per_slot]
        sizes = [len(b) for b in kept] + [0] * (per_slot - len(kept))
        samples = read[np.concatenate(kept)] if kept else np.zeros(0, np.int64)
        planned[s] = SlotPlan(pieces, samples, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                              planned=len(read), dropped=sum(len(b) for b in batches[per_slot:]), too_long=too_long)
    return EpochPlan(epoch, planned, per_slot, last)
