"""Audio files → codes with the Higgs Audio v2 codec (transformers' HiggsAudioV2TokenizerModel), and the check of a
`--codec` directory before any work."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from higgs_ds.data.tokens import AudioSettings
from higgs_ds.vocabulary import first_line

from ..cli import UsageError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class CodecEncoder:
    """Audio file → codes [K, T] with the codec's own `encode`, after downmix to mono and resampling to its rate
    (torchaudio's resampler: transformers' codec already depends on it for its 16 kHz semantic branch)."""

    def __init__(self, directory: str):
        import torch
        from transformers import HiggsAudioV2TokenizerModel

        self.torch = torch
        self.model = HiggsAudioV2TokenizerModel.from_pretrained(directory).eval()
        self.sample_rate = int(self.model.config.sample_rate)

    def load(self, path: Path):
        """Mono float32 waveform [1, 1, N] at the codec's sample rate."""
        import soundfile
        import torchaudio

        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
        wave = self.torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))[None, None]
        return wave if rate == self.sample_rate else torchaudio.functional.resample(wave, rate, self.sample_rate)

    def __call__(self, path: Path) -> np.ndarray:
        with self.torch.inference_mode():
            return self.model.encode(self.load(path), return_dict=False)[0].numpy()


def check_codec(directory: str, audio: AudioSettings) -> None:
    """Fail before any work when the codec directory is unusable or cannot produce codes for this model."""
    path = Path(directory)
    if not path.is_dir():
        why = "not a directory" if path.exists() else "not found"
        raise UsageError(f"--codec {directory}: {why} (expected a HiggsAudioV2TokenizerModel directory)")
    from transformers import HiggsAudioV2TokenizerConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise UsageError(f"--codec {directory}: no config.json (expected a HiggsAudioV2TokenizerModel "
                         "directory)") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"--codec {directory}: cannot read config.json ({first_line(exc)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != HiggsAudioV2TokenizerConfig.model_type:
        raise UsageError(f"--codec {directory}: config.json is not a codec config (model_type={model_type!r}, "
                         f"expected {HiggsAudioV2TokenizerConfig.model_type!r})")
    try:
        codec = HiggsAudioV2TokenizerConfig.from_pretrained(directory)
        num_quantizers, codebook_size = int(codec.num_quantizers), int(codec.codebook_size)
    except Exception as exc:  # noqa: BLE001 - one line, whatever transformers raises
        raise UsageError(f"--codec {directory}: cannot read the codec config ({first_line(exc)})") from None
    if not any((path / name).is_file() for name in WEIGHTS):
        raise UsageError(f"--codec {directory}: no weights ({WEIGHTS[0]} or {WEIGHTS[2]})")
    if num_quantizers != audio.num_codebooks or codebook_size > audio.codes_per_codebook:
        raise UsageError(f"--codec {directory}: produces {num_quantizers} codebooks of {codebook_size} "
                         f"codes; the model expects {audio.num_codebooks} of {audio.codes_per_codebook}")
