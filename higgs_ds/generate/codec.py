"""Codes → audio with the Higgs Audio v2 codec (transformers' HiggsAudioV2TokenizerModel), the decoder of the codec
the shard builder encodes with (data_tools/build/codec.py, whose `check_codec` checks the directory for both)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from data_tools.build.codec import check_codec

from ..data.tokens import AudioSettings


class CodecDecoder:
    """`decode(codes [K, T])` → mono float32 samples at `sample_rate`, T × `hop_length` of them; `write_wav` writes
    them as 32-bit float WAV (no clipping or rounding of what the codec produced)."""

    def __init__(self, directory: str | Path, audio: AudioSettings):
        import torch
        from transformers import HiggsAudioV2TokenizerModel

        check_codec(str(directory), audio)  # the model's codebooks: one line (UsageError) if they differ
        self.torch = torch
        self.model = HiggsAudioV2TokenizerModel.from_pretrained(str(directory)).eval()
        config = self.model.config
        self.sample_rate, self.hop_length = int(config.sample_rate), int(config.hop_length)
        self.num_codebooks, self.codebook_size = int(config.num_quantizers), int(config.codebook_size)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """De-delayed real codes [K, T ≥ 1]; stream bos/eos (ids ≥ the codebook size) are refused, not decoded."""
        k, size = self.num_codebooks, self.codebook_size
        if not isinstance(codes, np.ndarray) or codes.ndim != 2 or codes.shape[0] != k or codes.shape[1] < 1 \
                or codes.dtype.kind not in "iu":
            got = f"{codes.dtype} {codes.shape}" if isinstance(codes, np.ndarray) else type(codes).__name__
            raise ValueError(f"codec: expected integer codes [{k}, T>=1], got {got}")
        if codes.min() < 0 or codes.max() >= size:
            raise ValueError(f"codec: codes span [{codes.min()}, {codes.max()}], the codec takes [0, {size}) (stream "
                             "bos/eos must not reach it: pass de-delayed codes)")
        with self.torch.inference_mode():
            audio = self.model.decode(self.torch.from_numpy(codes.astype(np.int64))[None]).audio_values
        return audio[0, 0].float().numpy()

    def write_wav(self, path: str | Path, codes: np.ndarray) -> None:
        import soundfile

        soundfile.write(str(path), self.decode(codes), self.sample_rate, subtype="FLOAT")
