"""The one batch format that flows from the collator into the model. Contract shared by data/ and model/.

Positions are *expanded*: every audio segment occupies its frames in the sequence. Labels are **unshifted**
(aligned with the inputs, -100 where not learnable); the model shifts them (logits at t predict the label at t+1).

  input_ids        [B, L] long  text ids; audio-in frames hold the <|AUDIO|> id, audio-out frames <|AUDIO_OUT|>,
                                padding holds the pad id
  attention_mask   [B, L] bool  real (non-pad) positions
  position_ids     [B, L] long  0.. within each sample (restart at every packed sample; 0 on padding)
  segment_ids      [B, L] int32 1..n = which sample of the row a position belongs to; 0 = padding.
                                Attention and the label shift never cross a segment boundary.
  label_ids        [B, L] long  text labels, unshifted; -100 at audio frames, prompts, padding
  audio_in_mask    [B, L] bool  audio-in frame positions; row-major order == columns of audio_in_ids
  audio_out_mask   [B, L] bool  audio-out frame positions; row-major order == columns of audio_out_ids
  audio_in_ids     [K, N_in]  long  codes with stream bos/eos (+ delay pattern) for audio-in frames
  audio_out_ids    [K, N_out] long  the same for audio-out frames
  audio_out_labels [K, N_out] long  unshifted audio labels: -100 | codes | eos (+ delay -100s); all -100 for a
                                    segment that is not trained (before start_index)
An absent modality is a zero-size tensor ([K, 0]), never None, so every module runs on every rank (ZeRO-3).

  index            BatchIndex   every data-dependent index the model needs (routing order, shifted-target
                                positions, audio frame positions, cu_seqlens), computed on the CPU when the Batch
                                is made, so the model's forward+backward need no host sync (docs/design.md §4)
`Batch.validate(...)` checks the whole contract on the CPU (tests, first steps, a debug flag); the model's forward
checks only what costs nothing (shapes).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

IGNORE = -100  # label of a position that is not learnable (text and audio alike); torch's CE ignore_index default


class BatchError(ValueError):
    """A Batch that breaks the contract above; the message names the field (and the sample where one is to blame)."""


@dataclass
class BatchIndex:
    """What the model indexes the batch with, precomputed. Positions index the flattened [B*L] sequence.

    Routing (DualFFN): the residual stream lives in *grouped* order, text rows (padding included) first, then audio
    rows (audio-in and audio-out frames in sequence order), so norms and MLPs run on contiguous slices.
    Targets (the next-token shift, docs/design.md §5): hidden state t predicts the label at t+1 of the same segment.
      text:  positions t whose label at t+1 is learnable, t and t+1 in one segment;
      audio: audio-out frames j followed at the next position by frame j+1 of the same segment, whose label column
             j+1 has any code != -100.
    The labels themselves are gathered from the Batch in forward (label_ids at t+1, audio_out_labels column j+1)."""

    grouped_order: torch.Tensor  # long [B*L]: flat position of each grouped row
    grouped_inverse: torch.Tensor  # long [B*L]: grouped row of each flat position
    num_text_rows: int  # grouped rows [0, num_text_rows) are text (and padding)
    audio_positions: torch.Tensor  # long [N_in+N_out]: audio-in frames, then audio-out frames (columns of the ids)
    text_target_positions: torch.Tensor  # long [n_text]
    audio_target_frames: torch.Tensor  # long [n_audio]: columns of audio_out_ids (frame j predicts frame j+1)
    audio_target_positions: torch.Tensor  # long [n_audio]: flat positions of those frames
    cu_seqlens: torch.Tensor  # int32 [S+1]: a new sequence at every row start and segment change (varlen flash)
    max_seqlen: int
    needs_block_mask: bool  # some row holds padding or several samples (else plain causal attention suffices)

    def to(self, device, non_blocking: bool = False) -> "BatchIndex":
        return replace(self, **{f.name: v.to(device, non_blocking=non_blocking) for f in fields(self)
                                if isinstance(v := getattr(self, f.name), torch.Tensor)})

    def differences(self, other: "BatchIndex") -> list[str]:
        """Names of the fields that differ from `other`'s."""
        def same(a, b):
            return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
        return [f.name for f in fields(self) if not same(getattr(self, f.name), getattr(other, f.name))]


def index_batch(label_ids: torch.Tensor, segment_ids: torch.Tensor, audio_in_mask: torch.Tensor,
                audio_out_mask: torch.Tensor, audio_out_labels: torch.Tensor) -> BatchIndex:
    """The one computation of every BatchIndex (collator, hand-built test batches, model calls without an index).
    Data-dependent (nonzero, int()): run it on the CPU, where those cost no device sync."""
    rows, seq_len = segment_ids.shape
    segments = segment_ids.flatten()
    is_audio = (audio_in_mask | audio_out_mask).flatten()
    text_rows = (~is_audio).nonzero().squeeze(1)
    order = torch.cat([text_rows, is_audio.nonzero().squeeze(1)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)

    same_segment_next = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] > 0)
    next_learnable = same_segment_next & (label_ids[:, 1:] != IGNORE)
    text_positions = torch.nn.functional.pad(next_learnable, (0, 1)).flatten().nonzero().squeeze(1)
    # Frames are numbered row-major, so frame j+1 follows frame j exactly when it sits at the next flat position
    # of the same row (not wrapped to the next row) and the same segment.
    frame_positions = audio_out_mask.flatten().nonzero().squeeze(1)
    here, after = frame_positions[:-1], frame_positions[1:]
    followed = (after == here + 1) & (here % seq_len != seq_len - 1) & (segments[after] == segments[here])
    audio_frames = (followed & (audio_out_labels[:, 1:] != IGNORE).any(dim=0)).nonzero().squeeze(1)

    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[1:] = segments[1:] != segments[:-1]
    starts[::seq_len] = True
    boundaries = torch.cat([starts.nonzero().squeeze(1), segments.new_tensor([segments.numel()])]).to(torch.int32)
    return BatchIndex(
        grouped_order=order, grouped_inverse=inverse, num_text_rows=text_rows.numel(),
        audio_positions=torch.cat([audio_in_mask.flatten().nonzero(), frame_positions[:, None]]).squeeze(1),
        text_target_positions=text_positions, audio_target_frames=audio_frames,
        audio_target_positions=frame_positions[audio_frames], cu_seqlens=boundaries,
        max_seqlen=int((boundaries[1:] - boundaries[:-1]).max()),
        needs_block_mask=not bool((segment_ids == 1).all()))

TENSORS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "label_ids", "audio_in_mask",
           "audio_out_mask", "audio_in_ids", "audio_out_ids", "audio_out_labels")


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    label_ids: torch.Tensor
    audio_in_mask: torch.Tensor
    audio_out_mask: torch.Tensor
    audio_in_ids: torch.Tensor
    audio_out_ids: torch.Tensor
    audio_out_labels: torch.Tensor
    sample_keys: list[str] = field(default_factory=list)
    index: BatchIndex | None = None  # computed from the tensors above when not given

    def __post_init__(self):
        if self.index is None:
            self.index = index_batch(self.label_ids, self.segment_ids, self.audio_in_mask, self.audio_out_mask,
                                     self.audio_out_labels)

    def reindexed(self) -> "Batch":
        """The same Batch with its index recomputed: after editing its tensors in place (tests)."""
        return replace(self, index=None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The contract's tensors (what a saved batch holds; the index is derived from them)."""
        return {name: getattr(self, name) for name in TENSORS}

    def model_inputs(self) -> dict:
        """The model's forward kwargs: the tensors and the index."""
        return dict(self.tensors(), index=self.index)

    def to(self, device) -> "Batch":
        moved = {f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name),
                                                                        (torch.Tensor, BatchIndex))
                          else v) for f in fields(self)}
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def validate(self, vocab_size: int, ids_per_codebook: int, num_codebooks: int) -> None:
        """The whole contract, on the CPU: shapes, dtypes, id ranges, masks, positions, and an index that matches the
        tensors. Raises BatchError naming the field and, where one is to blame, the sample."""
        shape = tuple(self.input_ids.shape)
        if len(shape) != 2:
            raise BatchError(f"batch.input_ids must be [B, L], got {list(shape)}")
        for name, dtype in dict(input_ids=torch.long, attention_mask=torch.bool, position_ids=torch.long,
                                segment_ids=torch.int32, label_ids=torch.long, audio_in_mask=torch.bool,
                                audio_out_mask=torch.bool).items():
            value = getattr(self, name)
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise BatchError(f"batch.{name} is {value.dtype} {list(value.shape)}, expected {dtype} {list(shape)}")
        if self.sample_keys and len(self.sample_keys) != int(self._segment_starts().sum()):
            raise BatchError(f"batch.sample_keys names {len(self.sample_keys)} samples, the rows hold "
                             f"{int(self._segment_starts().sum())} segments")

        def fail_at(bad: torch.Tensor, name: str, why: str):
            """bad: bool [B, L]; names the first offending position and its sample."""
            if bad.any():
                row, col = (int(i) for i in bad.nonzero()[0])
                raise BatchError(f"batch.{name}[{row}, {col}]{self._sample_at(row, col)}: {why}")

        real = self.segment_ids > 0
        fail_at(self.segment_ids < 0, "segment_ids", "negative")
        fail_at(self.attention_mask != real, "attention_mask", "must equal segment_ids > 0 (padding is segment 0)")
        fail_at(self.audio_in_mask & self.audio_out_mask, "audio_in_mask", "overlaps audio_out_mask")
        fail_at((self.audio_in_mask | self.audio_out_mask) & ~real, "audio_in_mask | audio_out_mask",
                "an audio frame in padding")
        frames = {"audio_in_ids": int(self.audio_in_mask.sum()), "audio_out_ids": int(self.audio_out_mask.sum()),
                  "audio_out_labels": int(self.audio_out_mask.sum())}
        for name, count in frames.items():
            value = getattr(self, name)
            if tuple(value.shape) != (num_codebooks, count) or value.dtype != torch.long:
                raise BatchError(f"batch.{name} is {value.dtype} {list(value.shape)}, expected torch.int64 "
                                 f"[{num_codebooks}, {count}] (codebooks, frames in its mask)")

        fail_at((self.input_ids < 0) | (self.input_ids >= vocab_size), "input_ids",
                f"expected a text id in [0, {vocab_size})")
        fail_at((self.label_ids != IGNORE) & ((self.label_ids < 0) | (self.label_ids >= vocab_size)), "label_ids",
                f"expected {IGNORE} or a text id in [0, {vocab_size})")
        fail_at((self.label_ids != IGNORE) & (self.audio_in_mask | self.audio_out_mask | ~real), "label_ids",
                f"expected {IGNORE} at audio frames (audio targets live in audio_out_labels) and at padding")
        fail_at(self.position_ids != self._expected_positions(), "position_ids",
                "expected 0, 1, ... within each sample (0 on padding)")
        for name, low in (("audio_in_ids", 0), ("audio_out_ids", 0), ("audio_out_labels", IGNORE)):
            ids = getattr(self, name)
            bad = ((ids < 0) & (ids != low)) | (ids >= ids_per_codebook)
            if bad.any():
                codebook, frame = (int(i) for i in bad.nonzero()[0])
                raise BatchError(f"batch.{name}[{codebook}, {frame}] = {int(ids[codebook, frame])}: expected "
                                 f"{'-100 or ' if low else ''}an id in [0, {ids_per_codebook}) (codes and stream "
                                 "bos/eos)")
        fresh = index_batch(self.label_ids, self.segment_ids, self.audio_in_mask, self.audio_out_mask,
                            self.audio_out_labels)
        if stale := self.index.differences(fresh):
            raise BatchError(f"batch.index does not match the tensors ({', '.join(stale)} differ): the tensors were "
                             "edited after the Batch was made; use batch.reindexed()")

    def _segment_starts(self) -> torch.Tensor:
        """bool [B, L]: the first position of every sample."""
        starts = self.segment_ids > 0
        starts[:, 1:] &= self.segment_ids[:, 1:] != self.segment_ids[:, :-1]
        return starts

    def _expected_positions(self) -> torch.Tensor:
        flat_starts = self._segment_starts() | (self.segment_ids == 0)
        flat_starts[:, 0] = True
        columns = torch.arange(self.segment_ids.shape[1]).expand_as(self.segment_ids)
        last_start = torch.where(flat_starts, columns, 0).cummax(dim=1).values
        return torch.where(self.segment_ids > 0, columns - last_start, 0)

    def _sample_at(self, row: int, col: int) -> str:
        """' (sample KEY)' for a real position when the keys are known, else ''."""
        segment = int(self.segment_ids[row, col])
        if not self.sample_keys or segment == 0:
            return ""
        before = int(self._segment_starts()[:row].sum())
        return f" (sample {self.sample_keys[before + segment - 1]!r})"
