"""Special-token ids and audio-stream settings, read from the tokenizer and the model config (never hard-coded)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

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
    """Audio-stream facts the collator needs; derived from the checkpoint's config, not hand-set."""

    num_codebooks: int = 8
    codebook_size: int = 1024  # real codes 0..1023; bos/eos come after
    stream_bos_id: int = 1024
    stream_eos_id: int = 1025
    use_delay_pattern: bool = True

    def frames(self, num_codes: int) -> int:
        """Sequence positions one segment of `num_codes` frames occupies (bos + codes + eos [+ delay])."""
        return num_codes + 2 + (self.num_codebooks - 1 if self.use_delay_pattern else 0)

    @classmethod
    def from_model_config(cls, config: Mapping[str, Any] | str | Path) -> "AudioSettings":
        """Accepts a boson `config.json` (audio_num_codebooks, audio_codebook_size=1024, use_delay_pattern ...),
        a transformers-port config (num_codebooks, codebook_size=1026 incl. bos/eos), a dict of either, or a
        directory/file holding one."""
        if not isinstance(config, Mapping):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            config = json.loads(path.read_text())
            source = str(path)
        else:
            source = "<config dict>"
        if config.get("encode_whisper_embed") or config.get("skip_audio_tower") is False:
            raise ValueError(f"{source}: whisper audio features (encode_whisper_embed / audio tower) are not "
                             "supported; the released Higgs Audio v2 uses audio codes only")
        if "audio_num_codebooks" in config:  # boson layout
            if config.get("encode_audio_in_tokens") is False:
                raise ValueError(f"{source}: encode_audio_in_tokens=false is not supported")
            size = int(config.get("audio_codebook_size", 1024))
            return cls(
                num_codebooks=int(config["audio_num_codebooks"]),
                codebook_size=size,
                stream_bos_id=int(config.get("audio_stream_bos_id", size)),
                stream_eos_id=int(config.get("audio_stream_eos_id", size + 1)),
                use_delay_pattern=bool(config.get("use_delay_pattern", False)),
            )
        if "num_codebooks" in config:  # transformers port: codebook_size counts bos/eos; it always uses the delay
            size = int(config.get("codebook_size", 1024))
            bos = int(config.get("audio_stream_bos_id", 1024))
            eos = int(config.get("audio_stream_eos_id", 1025))
            if max(bos, eos) >= size:
                raise ValueError(f"{source}: codebook_size={size} does not cover stream bos/eos ids {bos}/{eos} "
                                 "(the converted release needs codebook_size=1026)")
            return cls(num_codebooks=int(config["num_codebooks"]), codebook_size=min(bos, eos),
                       stream_bos_id=bos, stream_eos_id=eos, use_delay_pattern=True)
        raise ValueError(f"{source}: not a Higgs Audio config (no audio_num_codebooks / num_codebooks)")
