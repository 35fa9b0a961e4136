"""The delay pattern undone: a generated segment's delayed columns → codes [K, T], one column per audio frame.

A delayed segment (as training data holds it and generation writes it) is column 0 all stream-bos, then codebook k
starts k columns late, and after its last code each codebook holds stream-eos (the ramp); K + 1 columns are not
frames. Codebook k's t-th code is column t + k + 1. A segment cut off (max_frames) before its ramp keeps the frames
every codebook has reached."""
from __future__ import annotations

import torch


def frames_in(columns: int, num_codebooks: int, ended: bool, use_delay_pattern: bool = True) -> int:
    """Complete frames in a delayed segment of `columns` columns (ended: it closed with its eos column(s))."""
    return max(0, columns - (num_codebooks if use_delay_pattern else 1) - (1 if ended else 0))


def revert_delay(delayed: torch.Tensor, ended: bool, use_delay_pattern: bool = True) -> torch.Tensor:
    """delayed [K, n] (column 0 the stream bos) → codes [K, T]."""
    k, n = delayed.shape
    frames = frames_in(n, k, ended, use_delay_pattern)
    if not use_delay_pattern:  # bos column, frames, then (ended) one eos column
        return delayed[:, 1: 1 + frames]
    index = torch.arange(frames, device=delayed.device)[None, :] + torch.arange(k, device=delayed.device)[:, None] + 1
    return delayed.gather(1, index)
