"""Writing one split: shards, their lengths sidecars and the manifest, each file atomically (temp name + rename)."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import webdataset as wds

from ..packing import round_up
from ..sample import TokenizedSample
from ..tokens import AudioSettings, SpecialTokens
from .files import atomic_write, file_sha256
from .manifest import Manifest, ShardInfo
from .sample_codec import _npy, encode_sample, sample_counts


def _tar_size(encoded: Mapping[str, Any]) -> int:
    """Bytes the sample's members take in the tar (header block + data rounded up to blocks)."""
    block = tarfile.BLOCKSIZE
    return sum(block + round_up(len(v), block) for k, v in encoded.items() if not k.startswith("__"))


class SplitWriter:
    """Writes one split: shards of at most `shard_samples` samples and/or about `shard_bytes` bytes (a sample
    larger than that gets a shard of its own), their length sidecars, then the manifest. Byte-identical for the
    same samples in the same order: fixed tar mtime/owner/mode and sorted JSON."""

    def __init__(self, directory: str | Path, split: str, fingerprint: dict[str, Any], tokens: SpecialTokens,
                 audio: AudioSettings, shard_samples: int | None = None, shard_bytes: int | None = None):
        if not shard_samples and not shard_bytes:
            raise ValueError("give shard_samples and/or shard_bytes")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest(split=split, fingerprint=fingerprint)
        self.tokens, self.audio = tokens, audio
        self.shard_samples, self.shard_bytes = shard_samples, shard_bytes
        self._tar = self._stream = None
        self._lengths: list[int] = []
        self._size = 0
        self.written: list[Path] = []

    def add(self, sample: TokenizedSample) -> None:
        encoded = encode_sample(sample, "000000")
        size = _tar_size(encoded)
        if self._tar is not None and (
                (self.shard_samples and len(self._lengths) >= self.shard_samples)
                or (self.shard_bytes and self._size + size > self.shard_bytes)):
            self.finish_shard()
        if self._tar is None:
            self._open()
        encoded["__key__"] = f"{len(self._lengths):06d}"
        self._tar.write(encoded)
        self._size += size
        counts = sample_counts(sample, self.tokens, self.audio)
        self._lengths.append(counts["expanded_tokens"])
        for name, value in counts.items():
            setattr(self._info, name, getattr(self._info, name) + value)

    def _open(self) -> None:
        self._info = ShardInfo(name=f"{self.manifest.split}-{len(self.manifest.shards):06d}.tar", bytes=0, sha256="")
        self._final = self.directory / self._info.name
        self._stream = open(self._final.with_name(self._final.name + ".tmp"), "wb")
        self._tar = wds.TarWriter(self._stream, encoder=False, mtime=0, user="higgs", group="higgs", mode=0o444)

    def finish_shard(self) -> None:
        """Close the current shard (if any) under its final name, with its sidecar."""
        if self._tar is None:
            return
        self._tar.close()
        self._stream.flush()
        os.fsync(self._stream.fileno())
        self._stream.close()
        tmp = self._final.with_name(self._final.name + ".tmp")
        self._info.bytes = tmp.stat().st_size
        self._info.sha256 = file_sha256(tmp)
        atomic_write(self.directory / self._info.lengths_name, _npy(np.array(self._lengths, dtype=np.int32)))
        os.replace(tmp, self._final)
        self.written += [self._final, self.directory / self._info.lengths_name]
        self.manifest.shards.append(self._info)
        self._tar = self._stream = None
        self._lengths, self._size = [], 0

    def close(self, skipped: int = 0, build: Mapping[str, Any] | None = None) -> Manifest:
        self.finish_shard()
        self.manifest.skipped, self.manifest.build = skipped, dict(build or {})
        self.written.append(self.manifest.save(self.directory))
        return self.manifest

    def abort(self) -> None:
        """Remove everything written so far (a failed build leaves no shards behind)."""
        if self._tar is not None:
            self._tar.close()
            self._stream.close()
            self._final.with_name(self._final.name + ".tmp").unlink(missing_ok=True)
            self._tar = self._stream = None
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written = []
