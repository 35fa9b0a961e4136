"""Shard format: WebDataset tars of pre-tokenized samples, plus a per-split manifest (DESIGN §6).

One split directory holds
  {split}-000000.tar           samples; tar key = the sample's position in the shard ("000000", no dots)
      .input_ids.npy            int32 [L]      text ids, one placeholder per audio segment
      .label_ids.npy            int32 [L]      -100 or equal to input_ids (labels are unshifted)
      .audio_codes.npy          int16 [K, ΣT]  every segment's codes, concatenated in order of appearance
                                               ([0, 0] for a sample without audio)
      .audio_lengths.npy        int32 [n]      T of each segment
      .meta.json                {"key": sample key, "meta": {...}}
  {split}-000000.lengths.npy   int32 [samples] expanded length of each sample in tar order (for batch planning)
  manifest.json                per-shard counts, totals and the data fingerprint
Only .npy (loaded with allow_pickle=False) and JSON: data never executes. Every file is written to a temporary
name and renamed, so a crash never leaves a half-written file under a final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from .chatml import IGNORE
from .sample import TokenizedSample
from .tokens import AudioSettings, SpecialTokens

FORMAT = "higgs-ds-shards/1"
MANIFEST = "manifest.json"
FIELDS = ("input_ids.npy", "label_ids.npy", "audio_codes.npy", "audio_lengths.npy", "meta.json")
COUNTS = ("samples", "text_tokens", "audio_frames", "learnable_text_tokens", "learnable_audio_tokens",
          "expanded_tokens")


class ShardError(ValueError):
    """A shard, or a sample in it, that does not match the format; the message names shard, key and field."""


# ---------------------------------------------------------------------------------------------------- samples

def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


# np.save's header for a C-ordered array of a plain dtype. Parsing it here instead of np.load's ast.literal_eval
# makes decoding ~40x cheaper, which is most of a sample's read cost. Anything else goes through np.load.
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|][iub][1248])', 'fortran_order': False, 'shape': \(((?:\d+, ?)*\d*)\), \} *\n")


def _load_npy(payload: bytes) -> np.ndarray:
    if payload[6:8] == b"\x01\x00":
        header_end = 10 + int.from_bytes(payload[8:10], "little")
        match = _NPY_HEADER.fullmatch(payload, 10, header_end)
        if match:
            shape = tuple(int(n) for n in match[2].split(b",") if n.strip())
            return np.frombuffer(payload, np.dtype(match[1].decode()), offset=header_end).reshape(shape)
    return np.load(io.BytesIO(payload), allow_pickle=False)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def encode_sample(sample: TokenizedSample, tar_key: str) -> dict[str, Any]:
    """TokenizedSample → {"__key__": tar_key, field: bytes} for a TarWriter."""
    if "." in tar_key or "/" in tar_key:
        raise ValueError(f"tar key {tar_key!r} must not contain '.' or '/' (webdataset splits fields at dots)")
    codes = np.concatenate(sample.audio_codes, axis=1) if sample.audio_codes else np.zeros((0, 0))
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
        raise ValueError(f"sample {sample.key!r}: audio codes span [{codes.min()}, {codes.max()}], do not fit int16")
    return {
        "__key__": tar_key,
        "input_ids.npy": _npy(sample.input_ids.astype(np.int32)),
        "label_ids.npy": _npy(sample.label_ids.astype(np.int32)),
        "audio_codes.npy": _npy(codes.astype(np.int16)),
        "audio_lengths.npy": _npy(np.array([c.shape[1] for c in sample.audio_codes], dtype=np.int32)),
        "meta.json": _json({"key": sample.key, "meta": sample.meta}),
    }


def decode_sample(raw: Mapping[str, Any], tokens: SpecialTokens, audio: AudioSettings) -> TokenizedSample:
    """A raw tar sample ({"__key__", "__url__", field: bytes}) → validated TokenizedSample, or ShardError."""
    where = f"{Path(str(raw.get('__url__', '?'))).name}: key {raw.get('__key__', '?')!r}"

    def fail(name: str, why: str):
        raise ShardError(f"{where}: {name}: {why}")

    missing = [name for name in FIELDS if name not in raw]
    if missing:
        fail(",".join(missing), f"missing (a sample holds {', '.join(FIELDS)})")

    def array(name: str, dtype, ndim: int) -> np.ndarray:
        if not raw[name].startswith(b"\x93NUMPY"):
            fail(name, "not a .npy array (no .npy header)")
        try:
            value = _load_npy(raw[name])
        except Exception as exc:  # noqa: BLE001 - any undecodable payload is reported the same way
            fail(name, f"not a readable .npy array ({type(exc).__name__}: {exc})")
        if value.dtype != dtype or value.ndim != ndim:
            fail(name, f"expected {np.dtype(dtype).name} with {ndim} dims, got {value.dtype} {value.shape}")
        return value

    try:
        meta = json.loads(raw["meta.json"])
    except (ValueError, UnicodeDecodeError) as exc:
        fail("meta.json", f"not valid JSON ({exc})")
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), str) or not isinstance(meta.get("meta"), dict):
        fail("meta.json", 'expected {"key": str, "meta": object}')
    where += f" (sample {meta['key']!r})"

    ids, labels = array("input_ids.npy", np.int32, 1), array("label_ids.npy", np.int32, 1)
    codes, lengths = array("audio_codes.npy", np.int16, 2), array("audio_lengths.npy", np.int32, 1)
    if len(ids) == 0:
        fail("input_ids.npy", "empty")
    if labels.shape != ids.shape:
        fail("label_ids.npy", f"shape {labels.shape} differs from input_ids {ids.shape}")
    if not np.all((labels == IGNORE) | (labels == ids)):
        fail("label_ids.npy", "labels must be -100 or equal to input_ids (unshifted)")
    if codes.shape[1] and codes.shape[0] != audio.num_codebooks:
        fail("audio_codes.npy", f"{codes.shape[0]} codebooks, the model has {audio.num_codebooks}")
    if np.any(lengths < 1) or int(lengths.sum()) != codes.shape[1]:
        fail("audio_lengths.npy", f"segment lengths {lengths.tolist()} must be >= 1 and sum to the "
                                  f"{codes.shape[1]} code columns of audio_codes")
    if codes.size and (codes.min() < 0 or codes.max() >= audio.codes_per_codebook):
        fail("audio_codes.npy", f"codes span [{codes.min()}, {codes.max()}], expected [0, {audio.codes_per_codebook})")
    placeholders = int(tokens.is_placeholder(ids).sum())
    if placeholders != len(lengths):
        fail("input_ids.npy", f"{placeholders} <|AUDIO|>/<|AUDIO_OUT|> placeholders but {len(lengths)} audio "
                              "segments")
    segments = np.split(codes, np.cumsum(lengths)[:-1], axis=1) if len(lengths) else []
    return TokenizedSample(key=meta["key"], input_ids=ids, label_ids=labels, audio_codes=segments,
                           meta=meta["meta"])


def sample_counts(sample: TokenizedSample, tokens: SpecialTokens, audio: AudioSettings) -> dict[str, int]:
    """The manifest's per-sample counts. Learnable audio tokens count label entries: a trained segment of T
    frames has num_codebooks × (T + 1) of them (its codes and one stream eos per codebook, DESIGN §3)."""
    is_placeholder = tokens.is_placeholder(sample.input_ids)
    segment_trained = sample.label_ids[is_placeholder] != IGNORE
    segment_out = sample.input_ids[is_placeholder] == tokens.audio_out
    frames = np.array([c.shape[1] for c in sample.audio_codes], dtype=np.int64)
    return {
        "samples": 1,
        "text_tokens": int((~is_placeholder).sum()),
        "audio_frames": int(frames.sum()),
        "learnable_text_tokens": int(((sample.label_ids != IGNORE) & ~is_placeholder).sum()),
        "learnable_audio_tokens": int(audio.num_codebooks * (frames + 1)[segment_out & segment_trained].sum()),
        "expanded_tokens": sample.num_expanded_tokens(audio),
    }


# ----------------------------------------------------------------------------------------------- reading tars

def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard in tar order, grouped by webdataset. A tar-level error (truncated member,
    duplicate field, a file that is not a tar) raises ShardError after the samples read before it. A tar cut
    exactly at a member boundary reads as shorter: compare with the manifest (`tar_complete` checks the end)."""
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            files = ({**f, "__url__": str(path)} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise ShardError(f"{path.name}: unreadable tar ({type(exc).__name__}: {exc})") from exc


def tar_complete(path: str | Path) -> bool:
    """True when the tar ends with its end-of-archive marker (two zero blocks), i.e. it was not cut short."""
    try:
        with tarfile.open(path, "r:") as tar:
            tar.getmembers()
            end = tar.offset
        with open(path, "rb") as stream:
            stream.seek(end)
            marker = stream.read(2 * tarfile.BLOCKSIZE)
    except (tarfile.TarError, OSError, EOFError):
        return False
    return len(marker) == 2 * tarfile.BLOCKSIZE and not any(marker)


# ------------------------------------------------------------------------------------------------- manifest

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
            manifest.tokens, manifest.audio  # noqa: B018 - fail here, not deep in a worker
        except (KeyError, TypeError) as exc:
            raise ShardError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc
        return manifest


# -------------------------------------------------------------------------------------------------- writing

def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def _tar_size(encoded: Mapping[str, Any]) -> int:
    """Bytes the sample's members take in the tar (header block + data rounded up to blocks)."""
    block = tarfile.BLOCKSIZE
    return sum(block + -(-len(v) // block) * block for k, v in encoded.items() if not k.startswith("__"))


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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
