"""One shard sample <-> its tar members (.npy arrays and JSON only: data never executes), and its manifest counts."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..batch import IGNORE
from ..sample import SampleError, TokenizedSample
from ..tokens import AudioSettings, SpecialTokens

FIELDS = ("input_ids.npy", "label_ids.npy", "audio_codes.npy", "audio_lengths.npy", "meta.json")


class ShardError(ValueError):
    """A shard, or a sample in it, that does not match the format; the message names shard, key and field."""


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


def decode_sample(raw: Mapping[str, Any], tokens: SpecialTokens, audio: AudioSettings,
                  vocab_size: int | None = None) -> TokenizedSample:
    """A raw tar sample ({"__key__", "__url__", field: bytes}) → validated TokenizedSample, or ShardError.
    The shard format is checked here; the sample contract by `TokenizedSample.validate`."""
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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        fail("meta.json", f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})")
    if not isinstance(meta, dict) or not isinstance(meta.get("key"), str) or not isinstance(meta.get("meta"), dict):
        fail("meta.json", 'expected {"key": str, "meta": object}')
    where += f" (sample {meta['key']!r})"

    ids, labels = array("input_ids.npy", np.int32, 1), array("label_ids.npy", np.int32, 1)
    codes, lengths = array("audio_codes.npy", np.int16, 2), array("audio_lengths.npy", np.int32, 1)
    if np.any(lengths < 1) or int(lengths.sum()) != codes.shape[1]:
        fail("audio_lengths.npy", f"segment lengths {lengths.tolist()} must be >= 1 and sum to the "
                                  f"{codes.shape[1]} code columns of audio_codes")
    segments = np.split(codes, np.cumsum(lengths)[:-1], axis=1) if len(lengths) else []
    sample = TokenizedSample(key=meta["key"], input_ids=ids, label_ids=labels, audio_codes=segments,
                             meta=meta["meta"])
    try:
        sample.validate(tokens, audio, vocab_size)
    except SampleError as exc:
        fail(exc.field, exc.why)
    return sample


def sample_counts(sample: TokenizedSample, tokens: SpecialTokens, audio: AudioSettings) -> dict[str, int]:
    """The manifest's per-sample counts. Learnable audio tokens count label entries: a trained segment of T
    frames has num_codebooks × (T + 1) of them (its codes and one stream eos per codebook, docs/design.md §4)."""
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


