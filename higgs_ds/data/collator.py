"""TokenizedSamples → one `Batch` (batch.py): audio streams, expansion, labels, padding/packing (docs/design.md §4).

Same tensors as upstream `HiggsAudioSampleCollator` followed by the model's `merge_input_ids_with_audio_features`
(right padding), without mutating the inputs, and vectorised over the whole batch: one `np.repeat` expands every
placeholder; streams are written undelayed and then shifted one codebook row at a time. Python loops run per
segment, row or codebook, never per token.

Per segment with codes c [K, T] and s_k = k under the delay pattern (else 0), column j of row k holds
  input: bos for j <= s_k, c[k, j-s_k-1] for s_k < j <= s_k+T, eos after;
  label: c[k, j-s_k-1] for s_k < j <= s_k+T, eos at j = s_k+T+1, -100 elsewhere (all -100 if not trained).
"""
from __future__ import annotations

from typing import NoReturn, Sequence

import numpy as np
import torch

from .batch import IGNORE, Batch
from .packing import first_fit_decreasing, round_up
from .sample import SampleError, TokenizedSample
from .tokens import AudioSettings, SpecialTokens

LAYOUTS = ("padded", "packed")


class Collator:
    """`padded`: one sample per row. `packed`: first-fit-decreasing into rows of `pack_length` expanded tokens,
    `segment_ids` 1..n per row. `Batch.sample_keys` lists the samples in row-major placement order (row 0's
    segments 1..n, then row 1's ...)."""

    def __init__(self, tokens: SpecialTokens, audio: AudioSettings, layout: str = "padded", round_to: int = 1,
                 pack_length: int | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {round_to}")
        if (layout == "packed") != (pack_length is not None):
            raise ValueError(f"pack_length is required by, and only by, layout='packed' (got layout={layout!r}, "
                             f"pack_length={pack_length})")
        if pack_length is not None and pack_length < 1:
            raise ValueError(f"pack_length must be >= 1, got {pack_length}")
        self.tokens, self.audio, self.layout = tokens, audio, layout
        self.round_to, self.pack_length = round_to, pack_length

    def __call__(self, samples: Sequence[TokenizedSample]) -> Batch:
        """Samples must be valid (`TokenizedSample.validate`, run where they enter: ChatML and shard decode)."""
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        lengths = np.array([s.num_expanded_tokens(self.audio) for s in samples])
        rows = self._pack(samples, lengths) if self.layout == "packed" else [[i] for i in range(len(samples))]
        order = [i for row in rows for i in row]
        placed = [samples[i] for i in order]

        # Segments in placement order == row-major order of the audio masks.
        ids = np.concatenate([s.input_ids for s in placed]).astype(np.int64)
        labels = np.concatenate([s.label_ids for s in placed]).astype(np.int64)
        is_placeholder = self.tokens.is_placeholder(ids)
        codes = [c for s in placed for c in s.audio_codes]
        seg_is_out = ids[is_placeholder] == self.tokens.audio_out
        seg_trained = labels[is_placeholder] >= 0  # upstream: the <|AUDIO_OUT|> text label decides
        in_ids, _ = self._streams([c for c, out in zip(codes, seg_is_out) if not out], None)
        out_ids, out_labels = self._streams([c for c, out in zip(codes, seg_is_out) if out], seg_trained[seg_is_out])

        # Expand: each placeholder repeats to its segment's frames; frames keep the placeholder id, label -100.
        repeats = np.ones(len(ids), dtype=np.int64)
        repeats[is_placeholder] = self.audio.frames(np.array([c.shape[1] for c in codes], dtype=np.int64))
        flat_ids = np.repeat(ids, repeats)
        flat_labels = np.repeat(np.where(is_placeholder, IGNORE, labels), repeats)
        placed_lengths = lengths[order]
        flat_position = np.arange(len(flat_ids)) - np.repeat(np.cumsum(placed_lengths) - placed_lengths,
                                                              placed_lengths)
        flat_segment = np.repeat(np.concatenate([np.arange(1, len(r) + 1) for r in rows]), placed_lengths)

        # Rows are consecutive runs of the flat sequence, left-aligned: a row-major boolean fill places them.
        row_lengths = np.array([lengths[r].sum() for r in rows])
        width = round_up(int(row_lengths.max()), self.round_to)
        real = np.arange(width)[None, :] < row_lengths[:, None]

        def fill(values, pad, dtype) -> torch.Tensor:
            out = np.full(real.shape, pad, dtype=dtype)
            out[real] = values
            return torch.from_numpy(out)

        return Batch(
            input_ids=fill(flat_ids, self.tokens.pad, np.int64),
            attention_mask=torch.from_numpy(real),
            position_ids=fill(flat_position, 0, np.int64),
            segment_ids=fill(flat_segment, 0, np.int32),
            label_ids=fill(flat_labels, IGNORE, np.int64),
            audio_in_mask=fill(flat_ids == self.tokens.audio_in, False, np.bool_),
            audio_out_mask=fill(flat_ids == self.tokens.audio_out, False, np.bool_),
            audio_in_ids=torch.from_numpy(in_ids),
            audio_out_ids=torch.from_numpy(out_ids),
            audio_out_labels=torch.from_numpy(out_labels),
            sample_keys=[s.key for s in placed],
        )

    def _streams(self, codes: list[np.ndarray], trained: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Input streams [K, Σ frames] of consecutive segments, and their labels unless `trained` is None."""
        k = self.audio.num_codebooks
        bos, eos = self.audio.stream_bos_id, self.audio.stream_eos_id
        num_codes = np.array([c.shape[1] for c in codes], dtype=np.int64)
        frames = self.audio.frames(num_codes)
        start = np.cumsum(frames) - frames
        # Undelayed first: [bos | c | eos ...] per row, labels [-100 | c | eos | -100 ...].
        ids = np.full((k, int(frames.sum())), eos, dtype=np.int64)
        ids[:, start] = bos
        labels = None if trained is None else np.full(ids.shape, IGNORE, dtype=np.int64)
        for n, c in enumerate(codes):
            ids[:, start[n] + 1:start[n] + 1 + c.shape[1]] = c
            if labels is not None and trained[n]:
                labels[:, start[n] + 1:start[n] + 1 + c.shape[1]] = c
                labels[:, start[n] + 1 + c.shape[1]] = eos
        if self.audio.use_delay_pattern:
            # Row r runs r frames late. A segment ends in k-1 eos/-100 frames, so shifting the whole row right by
            # r moves only padding across segment boundaries; the first r frames of each segment become bos/-100.
            for r in range(1, k):
                head = (start[:, None] + np.arange(r)).ravel()
                ids[r, r:] = ids[r, :-r].copy()
                ids[r, head] = bos
                if labels is not None:
                    labels[r, r:] = labels[r, :-r].copy()
                    labels[r, head] = IGNORE
        return ids, labels

    def _pack(self, samples: Sequence[TokenizedSample], lengths: np.ndarray) -> list[list[int]]:
        """First-fit-decreasing: rows of indices into `samples`, each row's total length <= pack_length."""
        for i in np.flatnonzero(lengths > self.pack_length)[:1]:
            _fail(samples[i], "input_ids + audio_codes", f"{lengths[i]} tokens once expanded, more than "
                                                         f"pack_length={self.pack_length}")
        return first_fit_decreasing(lengths, self.pack_length)


def _fail(sample: TokenizedSample, field: str, why: str) -> NoReturn:
    raise SampleError(sample.key, field, why)
