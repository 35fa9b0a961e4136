"""Packing arithmetic shared by the collator (which packs) and the stream's planner (which predicts the packing):
one first-fit-decreasing, one row simulation, one ceiling division."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def ceil_div(n, d):
    """⌈n / d⌉ for non-negative ints (and integer numpy arrays)."""
    return -(-n // d)


def round_up(n, multiple):
    return ceil_div(n, multiple) * multiple


def first_fit_decreasing(lengths: Sequence[int], capacity: int, max_rows: int | None = None) -> list[list[int]] | None:
    """Rows of indices into `lengths` (each row's total <= capacity): longest first (ties in index order), each
    into the first row with room. None as soon as more than `max_rows` rows would be needed. The collator packs
    with this function and the planner counts rows with it, so their row counts agree by construction."""
    lengths = [int(x) for x in lengths]
    free: list[int] = []
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        length = lengths[i]
        for r, room in enumerate(free):
            if room >= length:
                rows[r].append(i)
                free[r] = room - length
                break
        else:
            if max_rows is not None and len(rows) == max_rows:
                return None
            rows.append([i])
            free.append(capacity - length)
    return rows


def packed_end(lengths: np.ndarray, start: int, pack_length: int, max_rows: int) -> int:
    """The end j of the batch that starts at `start`: samples [start, j) pack into at most `max_rows` rows of
    `pack_length` and [start, j + 1) do not (or j = len). Every sample must fit a row alone.

    Any first-fit packing leaves at most one row no more than half full, so a total of T needs at most
    ⌊2T / P⌋ + 1 rows (a sure fit) and at least ⌈T / P⌉ (a sure miss); first-fit-decreasing decides in between,
    by bisection: a boundary where one more sample no longer fits, found with O(log n) packings."""
    window = 1024
    while True:
        totals = np.cumsum(lengths[start:start + window], dtype=np.int64)  # totals[k - 1]: first k samples
        sure_fit = int(np.searchsorted(2 * totals // pack_length + 1, max_rows, side="right"))
        sure_miss = int(np.searchsorted(ceil_div(totals, pack_length), max_rows, side="right")) + 1
        if sure_miss <= len(totals) or start + window >= len(lengths):
            break
        window *= 2
    low, high = max(sure_fit, 1), sure_miss  # fits(low) holds; fits(high) fails, or high is past the end
    if high > len(totals):
        if first_fit_decreasing(lengths[start:], pack_length, max_rows) is not None:
            return len(lengths)
        high = len(totals)
    while high - low > 1:
        middle = (low + high) // 2
        if first_fit_decreasing(lengths[start:start + middle], pack_length, max_rows) is not None:
            low = middle
        else:
            high = middle
    return start + low


def padded_end(lengths: np.ndarray, start: int, max_tokens: int, round_to: int) -> int:
    """The end j of the padded batch that starts at `start`: the most samples whose rows × (longest, rounded up
    to `round_to`) stay within `max_tokens` (that size only grows with each sample, so it is one search)."""
    window = 1024
    while True:
        longest = np.maximum.accumulate(lengths[start:start + window].astype(np.int64))
        size = np.arange(1, len(longest) + 1) * round_up(longest, round_to)
        count = int(np.searchsorted(size, max_tokens, side="right"))
        if count < len(longest) or start + window >= len(lengths):
            return start + max(count, 1)
        window *= 2
