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
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

IGNORE = -100  # label of a position that is not learnable (text and audio alike); torch's CE ignore_index default

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "segment_ids", "label_ids", "audio_in_mask",
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

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in MODEL_INPUTS}

    def to(self, device) -> "Batch":
        moved = {f.name: (v.to(device, non_blocking=True) if isinstance(v := getattr(self, f.name), torch.Tensor)
                          else v) for f in fields(self)}
        return Batch(**moved)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())
