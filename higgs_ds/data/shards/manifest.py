"""The per-split manifest: per-shard counts, totals, the data fingerprint, and the per-sample lengths sidecars."""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..tokens import AudioSettings, SpecialTokens
from .sample_codec import ShardError, _json
from .files import atomic_write
from .location import Location, is_remote, join, read_bytes

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
    path: Location | None = None  # where it was loaded from / saved to; not stored
    base: Location | None = None  # the split's directory or URL (location.py); not stored

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

    def shard_path(self, shard: ShardInfo) -> Location:
        return join(self.base, shard.name)

    def lengths(self, shard: ShardInfo) -> np.ndarray:
        """Expanded length of every sample of `shard`, in tar order (validated against the manifest)."""
        path = join(self.base, shard.lengths_name)
        try:
            lengths = np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise ShardError(f"{path}: cannot read the lengths sidecar ({type(exc).__name__}: {exc})") from exc
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
        self.path, self.base = path, path.parent
        return path

    @classmethod
    def load(cls, directory_or_file: Location) -> "Manifest":
        """Read and check a manifest (a split directory or URL, or the manifest itself): every malformed field raises
        ShardError naming the file and the field; a remote one that cannot be fetched raises FetchError."""
        if is_remote(directory_or_file):
            text = str(directory_or_file)
            base = text[:-len(MANIFEST)].rstrip("/") if text.endswith("/" + MANIFEST) else text
            path = join(base, MANIFEST)
        else:
            path = Path(directory_or_file)
            path = path / MANIFEST if path.is_dir() else path
            base = path.parent
        try:
            body = json.loads(read_bytes(path).decode())
        except (OSError, ValueError, RecursionError) as exc:
            raise ShardError(f"{path}: cannot read the manifest ({exc})") from exc
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            found = body.get("format") if isinstance(body, dict) else None
            raise ShardError(f"{path}: not a {FORMAT} manifest (format={found!r})")
        for name, kind in (("split", str), ("fingerprint", dict), ("shards", list)):
            if not isinstance(body.get(name), kind):
                raise ShardError(f"{path}: malformed manifest: {name}: expected {_KIND[kind]}, got "
                                 f"{type(body.get(name)).__name__}")
        skipped, build = body.get("skipped", 0), body.get("build", {})
        if type(skipped) is not int or skipped < 0 or not isinstance(build, dict):
            raise ShardError(f"{path}: malformed manifest: expected a non-negative integer 'skipped' and an object "
                             f"'build', got {skipped!r} and {type(build).__name__}")
        shards = [_shard_info(entry, index, path) for index, entry in enumerate(body["shards"])]
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ShardError(f"{path}: malformed manifest: shards listed twice: {', '.join(twice)}")
        manifest = cls(split=body["split"], fingerprint=body["fingerprint"], shards=shards, skipped=skipped,
                       build=build, path=path, base=base)
        try:
            manifest.tokens, manifest.audio, manifest.vocab_size  # noqa: B018 - fail here, not deep in a worker
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardError(f"{path}: malformed manifest fingerprint ({type(exc).__name__}: {exc})") from exc
        return manifest


_KIND = {str: "a string", dict: "an object", list: "a list"}


def _shard_info(entry: Any, index: int, path: Path) -> ShardInfo:
    """One entry of a manifest's "shards" list, checked: a plain .tar file name (no directories: the shard lies
    beside the manifest), a sha256 hex digest and non-negative integer sizes and counts (absent counts are 0)."""
    where = f"{path}: shards[{index}]"
    if not isinstance(entry, dict):
        raise ShardError(f"{where}: expected an object, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not name.endswith(".tar") or name.startswith(".") or "/" in name \
            or "\\" in name or "\0" in name:
        raise ShardError(f"{where}: name: expected a .tar file name beside the manifest, got {name!r}")
    where += f" ({name})"
    sha256 = entry.get("sha256")
    if not isinstance(sha256, str) or len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ShardError(f"{where}: sha256: expected 64 lowercase hex digits, got {sha256!r}")
    numbers = {}
    for key in ("bytes", *COUNTS):
        value = entry.get(key, None if key == "bytes" else 0)
        if type(value) is not int or value < 0:
            raise ShardError(f"{where}: {key}: expected a non-negative integer, got {value!r}")
        numbers[key] = value
    return ShardInfo(name=name, sha256=sha256, **numbers)
