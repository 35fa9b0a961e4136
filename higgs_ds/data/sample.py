"""One pre-tokenized training sample: what a shard stores and what the collator consumes, and its one validator."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from .batch import IGNORE
from .tokens import AudioSettings, SpecialTokens


class SampleError(ValueError):
    """A sample that breaks the sample contract; the message names the sample key and the offending field."""

    def __init__(self, key: str, field: str, why: str):
        super().__init__(f"sample {key!r}: {field}: {why}")
        self.key, self.field, self.why = key, field, why


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

    def validate(self, tokens: SpecialTokens, audio: AudioSettings, vocab_size: int | None = None) -> None:
        """The sample contract, checked where samples enter (ChatML → tokens, shard decode); the collator trusts
        it. `vocab_size`: the tokenizer's, when known (text ids must lie in [0, vocab_size)). Raises SampleError."""
        def fail(name: str, why: str) -> NoReturn:
            raise SampleError(self.key, name, why)

        ids, labels, k = self.input_ids, self.label_ids, audio.num_codebooks
        if not isinstance(ids, np.ndarray) or ids.ndim != 1 or len(ids) == 0 or ids.dtype.kind not in "iu":
            fail("input_ids", f"expected a non-empty 1-D integer array, got {_describe(ids)}")
        if not isinstance(labels, np.ndarray) or labels.shape != ids.shape or labels.dtype.kind not in "iu":
            fail("label_ids", f"expected an integer array shaped like input_ids {ids.shape}, got {_describe(labels)}")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bad = int(np.flatnonzero((ids < 0) | (ids >= (vocab_size or np.iinfo(np.int64).max)))[0])
            fail("input_ids", f"id {int(ids[bad])} at position {bad}, expected a text id in "
                              f"[0, {vocab_size if vocab_size is not None else 'vocab'})")
        if not np.all((labels == IGNORE) | (labels == ids)):
            bad = int(np.flatnonzero((labels != IGNORE) & (labels != ids))[0])
            fail("label_ids", f"{int(labels[bad])} at position {bad}: labels must be -100 or equal to input_ids "
                              "(unshifted)")
        placeholders = int(tokens.is_placeholder(ids).sum())
        if placeholders != len(self.audio_codes):
            fail("audio_codes", f"{len(self.audio_codes)} segments but input_ids hold {placeholders} "
                                "<|AUDIO|>/<|AUDIO_OUT|> placeholders")
        for n, c in enumerate(self.audio_codes):
            if not isinstance(c, np.ndarray) or c.ndim != 2 or c.shape[0] != k or c.shape[1] < 1 \
                    or c.dtype.kind not in "iu":
                fail(f"audio_codes[{n}]", f"expected an integer array [{k}, T>=1], got {_describe(c)}")
            if c.min() < 0 or c.max() >= audio.codes_per_codebook:
                fail(f"audio_codes[{n}]", f"codes span [{c.min()}, {c.max()}], expected "
                                          f"[0, {audio.codes_per_codebook})")


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"{value.dtype} {value.shape}"
    return type(value).__name__
