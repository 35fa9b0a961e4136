"""ChatML JSONL → WebDataset shards (higgs_ds/data/shards.py) with a manifest per split.

    python -m data_tools.build_shards samples.jsonl --tokenizer DIR --model-config DIR|config.json --out DIR \
        [--codec DIR] [--val-fraction F | --val-every N] [--shard-samples N] [--shard-bytes B] \
        [--workers N] [--seed S] [--on-error fail|skip]

Each line is one upstream ChatML sample; its key is sample["id"] if present, else its line number. Audio items
point (`audio_url`, relative to the JSONL's folder or absolute) to pre-computed codes (.npy, integer [K, T]) or to
an audio file that the codec (transformers' HiggsAudioV2TokenizerModel, `--codec DIR`) encodes after resampling
to its rate. Audio is encoded here, offline, never in the data loader.

Lines are shuffled with `--seed`, split, and processed in that order (by `--workers` processes whose results are
consumed in order), so the same input and seed give byte-identical shards whatever the worker count. Bad samples
stop the build (`--on-error fail`, exit 1, nothing left behind) or go to OUT/errors.jsonl and are counted in the
manifest (`--on-error skip`).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from higgs_ds.data.chatml import AudioRef, sample_from_chatml
from higgs_ds.data.sample import SampleError, TokenizedSample
from higgs_ds.data.shards import SplitWriter, atomic_write, data_fingerprint
from higgs_ds.data.tokens import AudioSettings, SpecialTokens
from higgs_ds.model_config import ConfigError, read_model_config


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


_worker: dict[str, Any] = {}  # per-process state: spec, tokenizer, codec (loaded on first audio file)


def init_worker(spec: BuildSpec) -> None:
    from transformers import AutoTokenizer

    if spec.codec_dir is not None:
        import torch

        torch.set_num_threads(1)  # the same float path in every process: codes must not depend on --workers
    _worker.update(spec=spec, tokenizer=AutoTokenizer.from_pretrained(spec.tokenizer_dir), codec=None)


def load_codes(ref: AudioRef, where: str) -> np.ndarray:
    """The codes [K, T] of one audio item: a .npy file of codes, or an audio file the codec encodes. Shapes and
    ranges are checked by the sample validator."""
    spec: BuildSpec = _worker["spec"]
    url = ref.item.get("audio_url")
    field = f"{where}: audio[{ref.index}].audio_url={url!r}"
    if not isinstance(url, str) or not url:
        raise BadSample(f"{where}: audio[{ref.index}]: needs an audio_url (inline raw_audio is not supported)")
    path = Path(url) if Path(url).is_absolute() else spec.base_dir / url
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
    if spec.codec_dir is None:
        raise BadSample(f"{field}: an audio file, but no --codec was given to encode it")
    if _worker["codec"] is None:
        _worker["codec"] = CodecEncoder(spec.codec_dir)
    try:
        return _worker["codec"](path)
    except RuntimeError as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise BadSample(f"{field}: cannot read/encode audio ({exc})") from exc


def process_line(job: tuple[int, str, bytes]) -> Result:
    line, split, text = job
    spec: BuildSpec = _worker["spec"]
    try:
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
        return Result(line, split, out)
    except BadSample as exc:
        return Result(line, split, error=str(exc))


def split_jobs(path: Path, seed: int, val_fraction: float, val_every: int) -> list[tuple[int, str, bytes]]:
    """(line number, split, raw line) in processing order: shuffled by `seed`, then every position assigned a
    split (the first round(val_fraction·N) positions, or every val_every-th, go to "val")."""
    lines = [(n, text) for n, text in enumerate(path.read_bytes().splitlines(), start=1) if text.strip()]
    order = np.random.default_rng(seed).permutation(len(lines))
    num_val = round(val_fraction * len(lines))

    def split(position: int) -> str:
        if position < num_val or (val_every and position % val_every == val_every - 1):
            return "val"
        return "train"

    return [(lines[i][0], split(p), lines[i][1]) for p, i in enumerate(order)]


def run_jobs(spec: BuildSpec, jobs: list, workers: int) -> Iterator[Result]:
    if workers <= 1:
        import torch

        threads = torch.get_num_threads()
        try:
            init_worker(spec)
            yield from map(process_line, jobs)
        finally:
            torch.set_num_threads(threads)  # init_worker may have changed it for this (the caller's) process
        return
    # spawn: forking a process that already runs torch threads can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(spec,)) as pool:
        yield from pool.imap(process_line, jobs, chunksize=8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_tools.build_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="JSONL file, one upstream ChatML sample per line")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--model-config", required=True, help="model config directory or config.json")
    p.add_argument("--codec", help="HiggsAudioV2TokenizerModel directory (needed for audio files)")
    p.add_argument("--out", required=True, type=Path, help="output directory (must be new or empty)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.0, help="fraction of samples for the val split")
    val.add_argument("--val-every", type=int, default=0, help="every N-th shuffled sample goes to val")
    p.add_argument("--shard-samples", type=int, help="samples per shard (default 1000 if no --shard-bytes)")
    p.add_argument("--shard-bytes", type=int, help="approximate bytes per shard")
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-order shuffle")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.val_every < 0 or (args.shard_samples or 1) < 1 or (args.shard_bytes or 1) < 1 or args.workers < 1:
        p.error("--val-every, --shard-samples, --shard-bytes and --workers must be positive")
    if not args.shard_samples and not args.shard_bytes:
        args.shard_samples = 1000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out}: exists and is not empty; refusing to mix builds")
    if not args.input.is_file():
        raise SystemExit(f"{args.input}: input JSONL not found")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        config = read_model_config(args.model_config, tokenizer)
    except ConfigError as exc:
        raise SystemExit(f"--model-config: {exc}") from None
    audio = config.audio
    tokens = SpecialTokens.from_tokenizer(tokenizer, pad_token_id=config.pad_token_id)
    if args.codec:
        check_codec(args.codec, audio)
    spec = BuildSpec(args.input.resolve().parent, args.tokenizer, args.codec, tokens, audio)
    jobs = split_jobs(args.input, args.seed, args.val_fraction, args.val_every)
    fingerprint = data_fingerprint(tokenizer, tokens, audio)
    writers = {split: SplitWriter(args.out / split, split, fingerprint, tokens, audio, args.shard_samples,
                                  args.shard_bytes) for split in sorted({split for _, split, _ in jobs})}
    errors: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    for result in tqdm(run_jobs(spec, jobs, args.workers), total=len(jobs), desc="samples", unit="sample"):
        if result.sample is not None and result.sample.key in first_line:
            result.error = (f"line {result.line}: id {result.sample.key!r} already used by line "
                            f"{first_line[result.sample.key]}")
        if result.error is not None:
            if args.on_error == "fail":
                for writer in writers.values():
                    writer.abort()
                print(f"error: {result.error}\n(--on-error fail: nothing written; --on-error skip skips bad "
                      "samples)", file=sys.stderr)
                return 1
            errors.append({"line": result.line, "split": result.split, "error": result.error})
            continue
        first_line[result.sample.key] = result.line
        writers[result.split].add(result.sample)

    build = {"input": str(args.input), "seed": args.seed, "val_fraction": args.val_fraction,
             "val_every": args.val_every, "shard_samples": args.shard_samples, "shard_bytes": args.shard_bytes}
    manifests = [w.close(sum(e["split"] == split for e in errors), build) for split, w in writers.items()]
    if errors:
        errors.sort(key=lambda e: e["line"])
        atomic_write(args.out / "errors.jsonl", b"".join(json.dumps(e).encode() + b"\n" for e in errors))
    for m in manifests:
        totals = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in m.totals.items())
        print(f"{m.split}: {len(m.shards)} shards; {totals}; skipped {m.skipped}")
    if errors:
        print(f"{len(errors)} bad samples skipped, listed in {args.out / 'errors.jsonl'}", file=sys.stderr)
    return 0


def check_codec(directory: str, audio: AudioSettings) -> None:
    """Fail before any work when the codec cannot produce codes for this model."""
    from transformers import HiggsAudioV2TokenizerConfig

    codec = HiggsAudioV2TokenizerConfig.from_pretrained(directory)
    if codec.num_quantizers != audio.num_codebooks or codec.codebook_size > audio.codes_per_codebook:
        raise SystemExit(f"--codec {directory}: produces {codec.num_quantizers} codebooks of {codec.codebook_size} "
                         f"codes; the model expects {audio.num_codebooks} of {audio.codes_per_codebook}")


if __name__ == "__main__":
    sys.exit(main())
