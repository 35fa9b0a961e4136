"""ChatML JSONL → WebDataset shards (the format of higgs_ds/data/shards/) with a manifest per split.

    python -m data_tools.build_shards samples.jsonl --tokenizer DIR --model-config DIR|config.json --out DIR \
        [--codec DIR] [--val-fraction F | --val-every N] [--shard-samples N] [--shard-bytes B] \
        [--workers N] [--seed S] [--on-error fail|skip]

Each line is one upstream ChatML sample; its key is sample["id"] if present, else its line number. Audio items
point (`audio_url`, relative to the JSONL's folder or absolute) to pre-computed codes (.npy, integer [K, T]) or to
an audio file that the codec (transformers' HiggsAudioV2TokenizerModel, `--codec DIR`) encodes after resampling
to its rate. Audio is encoded here, offline, never in the data loader.

Lines are shuffled with `--seed`, split, and processed in that order (by `--workers` processes whose results are
consumed in order), so the same input and seed give byte-identical shards whatever the worker count. Bad samples
stop the build (`--on-error fail`, exit 1) or go to OUT/errors.jsonl and are counted in the manifest
(`--on-error skip`); an unexpected exception while processing one sample counts as a bad sample, named by type.

The build is written to a temporary folder (OUT.partial-<pid> beside a new OUT, OUT/.partial-<pid> in an existing
empty one) and put in place only when it succeeded: a failed or interrupted build (bad sample, exception, Ctrl-C,
SIGTERM) leaves OUT as it was. Samples with turns in roles
outside system/user/assistant are kept (upstream tokenizes any role as spelled), counted per role in the manifests'
build info and reported in one warning line at the end.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from higgs_ds.data.chatml import AudioRef, sample_from_chatml
from higgs_ds.data.sample import SampleError, TokenizedSample
from higgs_ds.data.shards import Manifest, SplitWriter, atomic_write, data_fingerprint, encode_sample
from higgs_ds.data.tokens import AudioSettings, SpecialTokens
from higgs_ds.model_config import ConfigError, read_model_config

ROLES = "system/user/assistant"
SHOWN_ERRORS = 20  # skipped samples printed while building (all of them go to errors.jsonl)


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
    """One input line → a Result holding the sample or the reason it is bad. Never raises an Exception: whatever
    goes wrong with one sample (even an unexpected exception) makes it a bad sample, named by line and id."""
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


def exception_name(exc: BaseException) -> str:
    """The first public class name (numpy's _ArrayMemoryError → MemoryError)."""
    return next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))


def describe(exc: BaseException) -> str:
    """Type, message (first line) and the innermost frame of an unexpected exception, on one line."""
    text = " ".join(str(exc).split())
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (raised at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{exception_name(exc)}: {text[:500]}{where}"


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
    # spawn: forking a process that already runs torch threads can deadlock. The workers start with SIGINT ignored
    # (a spawned Python keeps an inherited SIG_IGN), so Ctrl-C interrupts only this process, which cleans up;
    # leaving the `with` (also when the consumer closes this generator early) terminates the workers.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(spec,))
    finally:
        signal.signal(signal.SIGINT, previous)
    with pool:
        yield from pool.imap(process_line, jobs, chunksize=8)


def _prog(script: str, module: str) -> str:
    """How the command was called: its console script (pyproject.toml) or `python -m`."""
    return script if Path(sys.argv[0]).name == script else module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=_prog("higgs-build-shards", "python -m data_tools.build_shards"),
                                description=__doc__.split("\n\n")[0])
    p.add_argument("input", type=Path, help="JSONL file, one upstream ChatML sample per line")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--model-config", required=True, help="model config directory or config.json")
    p.add_argument("--codec", help="HiggsAudioV2TokenizerModel directory (needed for audio files)")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (must not exist or be empty; written only when the build succeeds)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.0, help="fraction of samples for the val split")
    val.add_argument("--val-every", type=int, default=0, help="every N-th shuffled sample goes to val")
    p.add_argument("--shard-samples", type=int, help="samples per shard (default 1000 if no --shard-bytes)")
    p.add_argument("--shard-bytes", type=int, help="approximate bytes per shard")
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-order shuffle")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="what a bad sample does: 'fail' (default) stops the build with its line and field named, "
                        "exit 1, OUT left as it was; 'skip' leaves it out, lists it in OUT/errors.jsonl and counts "
                        "it in the manifest ('skipped')")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.val_every < 0 or (args.shard_samples or 1) < 1 or (args.shard_bytes or 1) < 1 or args.workers < 1:
        p.error("--val-every, --shard-samples, --shard-bytes and --workers must be positive")
    if not args.shard_samples and not args.shard_bytes:
        args.shard_samples = 1000
    return args


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else ""


def load_tokenizer(directory: str, flag: str = "--tokenizer"):
    """A tokenizer directory (save_pretrained) → the tokenizer; anything else is one line naming `flag`."""
    path = Path(directory)
    if not path.is_dir():
        why = "not a directory" if path.exists() else "not found"
        raise SystemExit(f"{flag} {directory}: {why} (expected a tokenizer directory, as written by save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, tokenizers' Exception ...
        raise SystemExit(f"{flag} {directory}: cannot load a tokenizer ({exception_name(exc)}: "
                         f"{_first_line(exc)})") from None


def special_tokens(tokenizer, directory: str, pad_token_id: int | None, flag: str = "--tokenizer") -> SpecialTokens:
    try:
        return SpecialTokens.from_tokenizer(tokenizer, pad_token_id=pad_token_id)
    except ValueError as exc:
        raise SystemExit(f"{flag} {directory}: {exc}") from None


def load_model_config(source: str, tokenizer, flag: str = "--model-config"):
    try:
        return read_model_config(source, tokenizer)
    except ConfigError as exc:  # names the file and the field
        raise SystemExit(f"{flag}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - still one line
        raise SystemExit(f"{flag} {source}: cannot read the model config ({exception_name(exc)}: "
                         f"{_first_line(exc)})") from None


def output_dir(out: Path) -> Path:
    """The real path OUT will be renamed to; refuses an OUT that holds anything."""
    try:
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise SystemExit(f"--out {out}: exists and is not a directory")
            if any(out.iterdir()):
                raise SystemExit(f"--out {out}: exists and is not empty; refusing to mix builds")
    except OSError as exc:
        raise SystemExit(f"--out {out}: {exc}") from None
    return Path(os.path.realpath(out))


class Staging:
    """The build's directory, on OUT's filesystem: OUT.partial-<pid> beside a new OUT (renamed to OUT at the end,
    atomically), or OUT/.partial-<pid> inside an existing empty OUT (its entries moved up at the end: OUT may be a
    mount point or the working directory). Removed, with any parent directories it had to create, unless
    `commit` put the build in place."""

    def __init__(self, out: Path):
        self.out = out
        self.inside = out.is_dir()
        name = f".partial-{os.getpid()}" if self.inside else f"{out.name}.partial-{os.getpid()}"
        self.path = out / name if self.inside else out.with_name(name)
        self.created: list[Path] = []  # deepest first
        self.committed = False

    def __enter__(self) -> Path:
        parent = self.out.parent
        while not parent.exists():
            self.created.append(parent)
            parent = parent.parent
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():  # left by a killed build that had the same pid
                shutil.rmtree(self.path)
            self.path.mkdir()
        except OSError as exc:
            self.__exit__()
            raise SystemExit(f"--out {self.out}: cannot create {self.path} ({exc})") from None
        return self.path

    def commit(self) -> None:
        try:
            if self.inside:
                for entry in sorted(self.path.iterdir()):
                    os.rename(entry, self.out / entry.name)
                self.path.rmdir()
            else:
                os.rename(self.path, self.out)
        except OSError as exc:
            self.committed = True  # keep the finished build where it is
            raise SystemExit(f"--out {self.out}: cannot move the finished build into place ({exc}); it is in "
                             f"{self.path}") from None
        self.committed = True

    def __exit__(self, *exc_info) -> None:
        if self.committed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:
                break


@dataclass
class BuildOutcome:
    manifests: list[Manifest]
    errors: list[dict[str, Any]]
    unknown_roles: Counter  # role outside system/user/assistant → samples with a turn in it
    unknown_role_samples: int


def write_build(args, spec: BuildSpec, jobs: list, directory: Path, fingerprint: dict[str, Any],
                build: dict[str, Any]) -> BuildOutcome | None:
    """Process every job and write the splits into `directory`; None when a bad sample stops the build."""
    splits = sorted({split for _, split, _ in jobs})
    writers = {split: SplitWriter(directory / split, split, fingerprint, spec.tokens, spec.audio, args.shard_samples,
                                  args.shard_bytes) for split in splits}
    errors: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    unknown = {split: Counter() for split in splits}
    unknown_samples = Counter()
    bar = tqdm(total=len(jobs), desc="samples", unit="sample")
    results = run_jobs(spec, jobs, args.workers)
    finished = False
    try:
        for result in results:
            bar.update()
            if result.sample is not None and result.sample.key in first_line:
                result.error = (f"line {result.line}: id {result.sample.key!r} already used by line "
                                f"{first_line[result.sample.key]}")
            if result.error is not None:
                if args.on_error == "fail":
                    bar.close()  # the message goes below the final bar, which is not drawn again
                    print(f"error: {result.error} (--on-error fail: nothing written to {args.out}; --on-error skip "
                          "skips bad samples)", file=sys.stderr)
                    return None
                errors.append({"line": result.line, "split": result.split, "error": result.error})
                if len(errors) <= SHOWN_ERRORS:
                    tqdm.write(f"skipped: {result.error}", file=sys.stderr)
                elif len(errors) == SHOWN_ERRORS + 1:
                    tqdm.write("skipped: more bad samples, not shown; errors.jsonl lists them all", file=sys.stderr)
                continue
            first_line[result.sample.key] = result.line
            roles = result.sample.meta.get("unknown_roles") or []
            if roles:
                unknown_samples[result.split] += 1
                unknown[result.split].update(roles)
            writers[result.split].add(result.sample)
        finished = True
    finally:
        results.close()  # stops the worker pool now, also on an early return or an exception
        bar.close()
        if not finished:
            for writer in writers.values():
                try:
                    writer.abort()  # closes the open shard (its directory is removed anyway)
                except Exception:  # noqa: BLE001 - cleanup must not hide the original error
                    pass

    manifests = []
    for split, writer in writers.items():
        info = {**build, "unknown_roles": dict(sorted(unknown[split].items())),
                "samples_with_unknown_roles": unknown_samples[split]}
        manifests.append(writer.close(sum(e["split"] == split for e in errors), info))
    if errors:
        errors.sort(key=lambda e: e["line"])
        atomic_write(directory / "errors.jsonl", b"".join(json.dumps(e).encode() + b"\n" for e in errors))
    return BuildOutcome(manifests, errors, sum(unknown.values(), Counter()), sum(unknown_samples.values()))


def unknown_roles_warning(roles: Counter, samples: int) -> str:
    listed = ", ".join(f"{role} ×{count}" for role, count in sorted(roles.items(), key=lambda rc: (-rc[1], rc[0])))
    verb = "sample has" if samples == 1 else "samples have"
    return f"warning: {samples} {verb} turns with roles outside {ROLES}: {listed} (kept as upstream does)"


def _sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = output_dir(args.out)
    if not args.input.is_file():
        raise SystemExit(f"{args.input}: input JSONL not found")
    tokenizer = load_tokenizer(args.tokenizer)
    special_tokens(tokenizer, args.tokenizer, None)  # a tokenizer without them is named as such, before the config
    config = load_model_config(args.model_config, tokenizer)
    audio = config.audio
    tokens = special_tokens(tokenizer, args.tokenizer, config.pad_token_id)
    if args.codec:
        check_codec(args.codec, audio)
    spec = BuildSpec(args.input.resolve().parent, args.tokenizer, args.codec, tokens, audio)
    try:
        jobs = split_jobs(args.input, args.seed, args.val_fraction, args.val_every)
    except OSError as exc:
        raise SystemExit(f"{args.input}: cannot read the input ({exc})") from None
    fingerprint = data_fingerprint(tokenizer, tokens, audio)
    build = {"input": str(args.input), "seed": args.seed, "val_fraction": args.val_fraction,
             "val_every": args.val_every, "shard_samples": args.shard_samples, "shard_bytes": args.shard_bytes}

    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)  # cleaned up like Ctrl-C
    except ValueError:  # not the main thread
        previous = None
    try:
        staging = Staging(out)
        with staging as directory:
            outcome = write_build(args, spec, jobs, directory, fingerprint, build)
            if outcome is None:
                return 1
            staging.commit()
    except KeyboardInterrupt as exc:
        by = " by SIGTERM" if exc.args == ("SIGTERM",) else ""
        print(f"interrupted{by}: nothing written to {args.out}", file=sys.stderr)
        return 143 if by else 130
    except OSError as exc:  # disk full, permissions ...: the machine, not a sample (those fail in their worker)
        print(f"error: {exception_name(exc)}: {exc} (nothing written to {args.out})", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)

    for m in outcome.manifests:
        totals = ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in m.totals.items())
        print(f"{m.split}: {len(m.shards)} shards; {totals}; skipped {m.skipped}")
    if outcome.errors:
        print(f"{len(outcome.errors)} bad samples skipped, listed in {args.out / 'errors.jsonl'}", file=sys.stderr)
    if outcome.unknown_role_samples:
        print(unknown_roles_warning(outcome.unknown_roles, outcome.unknown_role_samples), file=sys.stderr)
    return 0


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_codec(directory: str, audio: AudioSettings) -> None:
    """Fail before any work when the codec directory is unusable or cannot produce codes for this model."""
    path = Path(directory)
    if not path.is_dir():
        why = "not a directory" if path.exists() else "not found"
        raise SystemExit(f"--codec {directory}: {why} (expected a HiggsAudioV2TokenizerModel directory)")
    from transformers import HiggsAudioV2TokenizerConfig

    try:
        raw = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"--codec {directory}: no config.json (expected a HiggsAudioV2TokenizerModel "
                         "directory)") from None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--codec {directory}: cannot read config.json ({exception_name(exc)}: "
                         f"{_first_line(exc)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if model_type != HiggsAudioV2TokenizerConfig.model_type:
        raise SystemExit(f"--codec {directory}: config.json is not a codec config (model_type={model_type!r}, "
                         f"expected {HiggsAudioV2TokenizerConfig.model_type!r})")
    try:
        codec = HiggsAudioV2TokenizerConfig.from_pretrained(directory)
        num_quantizers, codebook_size = int(codec.num_quantizers), int(codec.codebook_size)
    except Exception as exc:  # noqa: BLE001 - one line, whatever transformers raises
        raise SystemExit(f"--codec {directory}: cannot read the codec config ({exception_name(exc)}: "
                         f"{_first_line(exc)})") from None
    if not any((path / name).is_file() for name in WEIGHTS):
        raise SystemExit(f"--codec {directory}: no weights ({WEIGHTS[0]} or {WEIGHTS[2]})")
    if num_quantizers != audio.num_codebooks or codebook_size > audio.codes_per_codebook:
        raise SystemExit(f"--codec {directory}: produces {num_quantizers} codebooks of {codebook_size} "
                         f"codes; the model expects {audio.num_codebooks} of {audio.codes_per_codebook}")


if __name__ == "__main__":
    sys.exit(main())
