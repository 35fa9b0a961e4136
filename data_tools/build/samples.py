"""One JSONL line → a shard sample or the reason it is bad, in a worker process (or in the builder's own, with
`--workers 1`). Whatever goes wrong with one sample, even an unexpected exception, makes it a bad sample named by
line and id, never a crash."""
from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from higgs_ds.data.chatml import AudioRef, sample_from_chatml
from higgs_ds.data.sample import SampleError, TokenizedSample
from higgs_ds.data.shards import encode_sample
from higgs_ds.data.tokens import AudioSettings, SpecialTokens
from higgs_ds.vocabulary import exception_name

from .codec import CodecEncoder


class BadSample(ValueError):
    """An input sample that cannot become a shard sample; the message names its line and field."""


@dataclass(frozen=True)
class BuildSpec:
    """Everything a worker process needs (picklable)."""

    base_dir: Path
    tokenizer_dir: str
    codec_dir: str | None
    tokens: SpecialTokens
    audio: AudioSettings


@dataclass
class Result:
    line: int
    split: str
    sample: TokenizedSample | None = None
    error: str | None = None


_worker: dict[str, Any] = {}  # per-process state: spec, tokenizer, codec (loaded on first audio file)


def init_worker(spec: BuildSpec) -> None:
    """Per-process setup. A failure is kept and reported for each sample: an initializer that raises would make
    multiprocessing restart the worker forever."""
    _worker.clear()
    try:
        from transformers import AutoTokenizer

        if spec.codec_dir is not None:
            import torch

            torch.set_num_threads(1)  # the same float path in every process: codes must not depend on --workers
        _worker.update(spec=spec, tokenizer=AutoTokenizer.from_pretrained(spec.tokenizer_dir), codec=None)
    except Exception as exc:  # noqa: BLE001 - reported per sample, see process_line
        _worker.update(spec=spec, init_error=describe(exc))


def load_codes(ref: AudioRef, where: str) -> np.ndarray:
    """The worker's `read_codes`: its spec's folder, its codec loaded on the first audio file."""
    spec: BuildSpec = _worker["spec"]

    def codec() -> CodecEncoder:
        if _worker["codec"] is None:
            _worker["codec"] = CodecEncoder(spec.codec_dir)
        return _worker["codec"]

    return read_codes(ref, where, spec.base_dir, codec if spec.codec_dir is not None else None)


def read_codes(ref: AudioRef, where: str, base_dir: Path,
               codec: Callable[[], Callable[[Path], np.ndarray]] | None) -> np.ndarray:
    """The codes [K, T] of one audio item: a .npy file of codes, or an audio file that `codec()` (the encoder;
    None: no --codec) encodes. Paths are relative to `base_dir` (the JSONL's folder). Shapes and ranges are checked
    by the sample validator; every problem is a BadSample naming `where` and the item."""
    url = ref.item.get("audio_url")
    field = f"{where}: audio[{ref.index}].audio_url={url!r}"
    if not isinstance(url, str) or not url:
        raise BadSample(f"{where}: audio[{ref.index}]: needs an audio_url (inline raw_audio is not supported)")
    path = Path(url) if Path(url).is_absolute() else base_dir / url
    try:
        found = path.is_file()
    except (OSError, ValueError) as exc:  # a component over NAME_MAX, an embedded NUL ...
        raise BadSample(f"{field}: not a usable path ({type(exc).__name__}: {exc})") from None
    if not found:
        raise BadSample(f"{field}: file {path} not found")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:  # EOFError: an empty file
            raise BadSample(f"{field}: not a readable .npy array ({type(exc).__name__}: {exc})") from None
    if codec is None:
        raise BadSample(f"{field}: an audio file, but no --codec was given to encode it")
    encode = codec()
    try:
        return encode(path)
    except RuntimeError as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise BadSample(f"{field}: cannot read/encode audio ({exc})") from exc


def process_line(job: tuple[int, str, bytes]) -> Result:
    """One input line → a Result holding the sample or the reason it is bad. Never raises an Exception."""
    line, split, text = job
    where = f"line {line}"
    try:
        if "init_error" in _worker:
            raise BadSample(f"{where}: the worker process could not start ({_worker['init_error']})")
        spec: BuildSpec = _worker["spec"]
        try:
            sample = json.loads(text)
        except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser allows
            raise BadSample(f"line {line}: malformed JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
        key = sample.get("id", line) if isinstance(sample, dict) else line
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise BadSample(f"line {line}: id: expected a string or integer, got {type(key).__name__}")
        where = f"line {line} (sample {str(key)!r})"
        try:
            out = sample_from_chatml(sample, _worker["tokenizer"], spec.tokens, spec.audio,
                                     lambda ref: load_codes(ref, where), key=str(key), meta={"line": line})
        except SampleError as exc:
            raise BadSample(f"line {line}: {exc}") from None
        out.audio_codes = [c.astype(np.int16) for c in out.audio_codes]  # validated: codes < codes_per_codebook
        try:  # what the writer will do with it: text a shard cannot store (a lone surrogate in id or speaker)
            encode_sample(out, "000000")  # fails here, as this sample's error, not in the writer
        except (ValueError, UnicodeError) as exc:
            raise BadSample(f"{where}: cannot be stored in a shard ({type(exc).__name__}: {exc})") from None
        return Result(line, split, out)
    except BadSample as exc:
        return Result(line, split, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - one sample's unexpected failure is a bad sample, never a crash
        return Result(line, split, error=f"{where}: unexpected {describe(exc)}")


def describe(exc: BaseException) -> str:
    """Type, message (first line) and the innermost frame of an unexpected exception, on one line."""
    text = " ".join(str(exc).split())
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (raised at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{exception_name(exc)}: {text[:500]}{where}"
