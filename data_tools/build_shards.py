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
import signal
import sys
from pathlib import Path

from higgs_ds.vocabulary import exception_name, load_vocabulary

from data_tools.build.codec import check_codec
from data_tools.build.pool import split_jobs
from data_tools.build.samples import BuildSpec
from data_tools.build.staging import Staging, output_dir
from data_tools.build.writing import unknown_roles_warning, write_build
from data_tools.cli import HelpFormatter, UsageError, prog, reports_errors


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("higgs-build-shards", "python -m data_tools.build_shards"),
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("input", type=Path, help="JSONL file, one upstream ChatML sample per line")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory")
    p.add_argument("--model-config", required=True, help="model config directory or config.json")
    p.add_argument("--codec", help="HiggsAudioV2TokenizerModel directory (needed for audio files)")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (must not exist or be empty; written only when the build succeeds)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.0, help="fraction of samples for the val split")
    val.add_argument("--val-every", type=int, default=0, help="every N-th shuffled sample goes to val (0: none)")
    p.add_argument("--shard-samples", type=int, help="samples per shard (default 1000 if no --shard-bytes)")
    p.add_argument("--shard-bytes", type=int, help="approximate bytes per shard (default: no byte limit)")
    p.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-order shuffle")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="what a bad sample does: 'fail' (default) stops the build with its line and field named, "
                        "exit 1, OUT left as it was; 'skip' leaves it out, lists it in OUT/errors.jsonl and counts "
                        "it in the manifest ('skipped')")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.val_every < 0 or (args.shard_samples or 1) < 1 or (args.shard_bytes or 1) < 1 or args.workers < 1:
        p.error("--val-every, --shard-samples, --shard-bytes and --workers must be positive")
    if not args.shard_samples and not args.shard_bytes:
        args.shard_samples = 1000
    return args


def _sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = output_dir(args.out)
    if not args.input.is_file():
        raise UsageError(f"{args.input}: input JSONL not found")
    vocabulary = load_vocabulary(args.tokenizer, args.model_config)
    audio, tokens = vocabulary.model_config.audio, vocabulary.tokens
    if args.codec:
        check_codec(args.codec, audio)
    spec = BuildSpec(args.input.resolve().parent, args.tokenizer, args.codec, tokens, audio)
    try:
        jobs = split_jobs(args.input, args.seed, args.val_fraction, args.val_every)
    except OSError as exc:
        raise UsageError(f"{args.input}: cannot read the input ({exc})") from None
    build = {"input": str(args.input), "seed": args.seed, "val_fraction": args.val_fraction,
             "val_every": args.val_every, "shard_samples": args.shard_samples, "shard_bytes": args.shard_bytes}

    try:
        previous = signal.signal(signal.SIGTERM, _sigterm)  # cleaned up like Ctrl-C
    except ValueError:  # not the main thread
        previous = None
    try:
        staging = Staging(out)
        with staging as directory:
            outcome = write_build(args, spec, jobs, directory, vocabulary.fingerprint(), build)
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


if __name__ == "__main__":
    sys.exit(main())
