"""The per-split manifest: per-shard counts, totals, the data fingerprint, and the per-sample lengths sidecars."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..tokens import AudioSettings, SpecialTokens
from .sample_codec import ShardError, _json
from .files import atomic_write

FORMAT = "higgs-ds-shards/2"  # 2: audio settings name codes_per_codebook
MANIFEST = "manifest.json"
COUNTS = ("samples", "text_tokens", "audio_frames", "learnable_text_tokens", "learnable_audio_tokens",
          "expanded_tokens")


def data_fingerprint(tokenizer, tokens: SpecialTokens, audio: AudioSettings) -> dict[str, Any]:
    """What the shards' tokens and codes depend on; the trainer compares its own with the manifest's."""
    vocab = sorted(tokenizer.get_vocab().items())
    return {"tokenizer_vocab_sha256": hashlib.sha256(_json(vocab)).hexdigest(), "vocab_size": len(vocab),
            "special_tokens": asdict(tokens), "audio": asdict(audio)}


def check_fingerprint(manifest: "Manifest", expected: Mapping[str, Any]) -> None:
    """Refuse shards built with another tokenizer or model config."""
    differ = sorted(k for k in set(expected) | set(manifest.fingerprint)
                    if expected.get(k) != manifest.fingerprint.get(k))
    if differ:
        detail = "; ".join(f"{k}: shards {manifest.fingerprint.get(k)!r} vs expected {expected.get(k)!r}"
                           for k in differ)
        raise ValueError(f"{manifest.path}: shards were built for another tokenizer/model config ({detail})")


@dataclass
class ShardInfo:
    name: str
    bytes: int
    sha256: str
    samples: int = 0
    text_tokens: int = 0
    audio_frames: int = 0
    learnable_text_tokens: int = 0
    learnable_audio_tokens: int = 0
    expanded_tokens: int = 0

    @property
    def lengths_name(self) -> str:
        return self.name.removesuffix(".tar") + ".lengths.npy"


@dataclass
class Manifest:
    split: str
    fingerprint: dict[str, Any]
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: int = 0  # bad input samples the builder skipped (--on-error skip); see errors.jsonl beside it
    build: dict[str, Any] = field(default_factory=dict)  # how it was built (input, seed, options)
    path: Path | None = None  # where it was loaded from / saved to; not stored

    @property
    def totals(self) -> dict[str, int]:
        return {name: sum(getattr(s, name) for s in self.shards) for name in COUNTS}

    @property
    def tokens(self) -> SpecialTokens:
        return SpecialTokens(**self.fingerprint["special_tokens"])

    @property
    def audio(self) -> AudioSettings:
        return AudioSettings(**self.fingerprint["audio"])

    @property
    def vocab_size(self) -> int:
        """The tokenizer's: every text id in the shards lies below it."""
        return int(self.fingerprint["vocab_size"])

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.path.parent / shard.name

    def lengths(self, shard: ShardInfo) -> np.ndarray:
        """Expanded length of every sample of `shard`, in tar order (validated against the manifest)."""
        path = self.path.parent / shard.lengths_name
        try:
            lengths = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: cannot read the lengths sidecar ({exc})") from exc
        if lengths.dtype != np.int32 or lengths.shape != (shard.samples,) or int(lengths.sum()) != \
                shard.expanded_tokens:
            raise ShardError(f"{path}: expected int32 [{shard.samples}] summing to {shard.expanded_tokens}, got "
                             f"{lengths.dtype} {lengths.shape} summing to {int(lengths.sum())}")
        return lengths

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST
        body = {"format": FORMAT, "split": self.split, "fingerprint": self.fingerprint, "totals": self.totals,
                "skipped": self.skipped, "build": self.build, "shards": [asdict(s) for s in self.shards]}
        atomic_write(path, json.dumps(body, indent=1, sort_keys=True).encode() + b"\n")
        self.path = path
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "Manifest":
        path = Path(directory_or_file)
        path = path / MANIFEST if path.is_dir() else path
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: cannot read the manifest ({exc})") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else None
            raise ShardError(f"{path}: not a {FORMAT} manifest (format={found!r})")
        names = {f.name for f in fields(ShardInfo)}
        try:
            shards = [ShardInfo(**{k: v for k, v in s.items() if k in names}) for s in body["shards"]]
            manifest = cls(split=body["split"], fingerprint=body["fingerprint"], shards=shards,
                           skipped=body.get("skipped", 0), build=body.get("build", {}), path=path)
            manifest.tokens, manifest.audio, manifest.vocab_size  # noqa: B018 - fail here, not deep in a worker
        except (KeyError, TypeError) as exc:
            raise ShardError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        return manifest


