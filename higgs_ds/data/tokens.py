"""Special-token ids and audio-stream settings, read from the tokenizer and the model config (never hard-coded)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKEN_NAMES = {
    "begin_of_text": "<|begin_of_text|>",
    "end_of_text": "<|end_of_text|>",
    "start_header": "<|start_header_id|>",
    "end_header": "<|end_header_id|>",
    "eot": "<|eot_id|>",
    "eom": "<|eom_id|>",
    "recipient": "<|recipient|>",
    "audio_bos": "<|audio_bos|>",
    "audio_eos": "<|audio_eos|>",
    "audio_out_bos": "<|audio_out_bos|>",
    "audio_in": "<|AUDIO|>",
    "audio_out": "<|AUDIO_OUT|>",
}


@dataclass(frozen=True)
class SpecialTokens:
    begin_of_text: int
    end_of_text: int
    start_header: int
    end_header: int
    eot: int
    eom: int
    recipient: int
    audio_bos: int
    audio_eos: int
    audio_out_bos: int
    audio_in: int
    audio_out: int
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer, pad_token_id: int | None = None) -> "SpecialTokens":
        ids = {}
        for field, token in TOKEN_NAMES.items():
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} lacks special token {token}")
            ids[field] = int(tid)
        # Upstream pads with <|end_of_text|> (the model config's pad_token_id says the same for the release).
        ids["pad"] = int(pad_token_id) if pad_token_id is not None else ids["end_of_text"]
        return cls(**ids)

    def is_placeholder(self, ids: np.ndarray) -> np.ndarray:
        """Where `ids` holds an <|AUDIO|> or <|AUDIO_OUT|> placeholder (one per audio segment)."""
        return (ids == self.audio_in) | (ids == self.audio_out)


@dataclass(frozen=True)
class AudioSettings:
    """Audio-stream facts the collator needs. Derived from the checkpoint's config by the one reader
    (`higgs_ds.model_config.read_model_config(...).audio`), never hand-set in training code."""

    num_codebooks: int = 8
    codes_per_codebook: int = 1024  # real codes 0..1023; the stream bos/eos ids come after them
    stream_bos_id: int = 1024
    stream_eos_id: int = 1025
    use_delay_pattern: bool = True

    def __post_init__(self):
        for name in ("num_codebooks", "codes_per_codebook", "stream_bos_id", "stream_eos_id"):
            if type(getattr(self, name)) is not int:
                raise ValueError(f"audio settings: {name} must be an int, got {getattr(self, name)!r}")
        if type(self.use_delay_pattern) is not bool:
            raise ValueError(f"audio settings: use_delay_pattern must be a bool, got {self.use_delay_pattern!r}")
        if self.num_codebooks < 1 or self.codes_per_codebook < 1:
            raise ValueError(f"audio settings: need >= 1 codebook of >= 1 code, got {self.num_codebooks} codebooks "
                             f"of {self.codes_per_codebook} codes")
        if min(self.stream_bos_id, self.stream_eos_id) < self.codes_per_codebook:
            raise ValueError(f"audio settings: stream bos/eos ids {self.stream_bos_id}/{self.stream_eos_id} fall "
                             f"inside the code range [0, {self.codes_per_codebook}): they must come after the codes")
        if self.stream_bos_id == self.stream_eos_id:
            raise ValueError(f"audio settings: stream bos and eos share the id {self.stream_bos_id}")

    def frames(self, num_codes):
        """Sequence positions one segment of `num_codes` frames occupies (bos + codes + eos [+ delay])."""
        return num_codes + 2 + (self.num_codebooks - 1 if self.use_delay_pattern else 0)
