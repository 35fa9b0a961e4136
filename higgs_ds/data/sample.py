"""One pre-tokenized training sample: what a shard stores and what the collator consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .tokens import AudioSettings, SpecialTokens


@dataclass
class TokenizedSample:
    """`input_ids`/`label_ids` hold one placeholder (<|AUDIO|> or <|AUDIO_OUT|>) per audio segment, unexpanded.
    `audio_codes[i]` is the i-th segment in order of appearance (audio-in and audio-out numbered together),
    integer [num_codebooks, T] with codes in 0..codes_per_codebook-1 (no bos/eos, no delay)."""

    key: str
    input_ids: np.ndarray  # int32 [L]
    label_ids: np.ndarray  # int32 [L], -100 = not learnable
    audio_codes: list[np.ndarray] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def placeholder_positions(self, tokens: SpecialTokens) -> np.ndarray:
        return np.flatnonzero(tokens.is_placeholder(self.input_ids))

    def num_expanded_tokens(self, audio: AudioSettings) -> int:
        """Sequence length after each placeholder is replaced by its segment's frames."""
        return int(len(self.input_ids) - len(self.audio_codes)
                   + sum(audio.frames(c.shape[1]) for c in self.audio_codes))
