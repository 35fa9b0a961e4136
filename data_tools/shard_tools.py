"""Look inside shards and check them.

    python -m data_tools.shard_tools inspect SHARD_OR_DIR [--key K] [--tokenizer DIR] [--model-config ...]
                                             [--max-samples N] [--dump-batch FILE.npz|.safetensors --batch-size N]
    python -m data_tools.shard_tools validate DIR|SHARD... [--tokenizer DIR --model-config ...]

`inspect` renders one sample (the first, or --key: sample key or tar key) with its label mask visible — learnable
text inside ⟦…⟧, each audio segment as <audio-out T=123 trained> — prints masking statistics per role and
modality over the samples read, and can dump the collated batch that starts at that sample (no pickle).
`validate` reads every shard completely and reports EVERY problem by shard and key: tar integrity, schema, code
ranges and codebook count, placeholder/audio agreement, and agreement with the manifest (counts, lengths
sidecar, size, sha256). Exit status 1 when anything is bad.
Special tokens and audio settings come from the manifest beside the shards, or from --tokenizer/--model-config.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from higgs_ds.data.collator import Collator
from higgs_ds.data.masking import mask_stats, masking_rows, table
from higgs_ds.data.sample import TokenizedSample
from higgs_ds.data.batch import IGNORE
from higgs_ds.data.shards import (COUNTS, MANIFEST, Manifest, ShardError, Stray, atomic_write, decode_sample,
                                  file_sha256, sample_counts, shard_entries, tar_problem)
from higgs_ds.data.tokens import AudioSettings, SpecialTokens

from higgs_ds.vocabulary import load_tokenizer, load_vocabulary

from data_tools.cli import HelpFormatter, UsageError, prog, reports_errors

LEARNABLE = ("⟦", "⟧")


def find_shards(target: Path) -> list[tuple[Manifest | ShardError | None, list[Path]]]:
    """(manifest, shard paths) groups for a split dir, a build dir holding split dirs, or a shard file. The manifest
    is None for a shard with no manifest beside it, or the ShardError of a manifest that cannot be read (a split
    dir's shards are then unknown: no paths)."""
    if not target.exists():
        raise UsageError(f"{target}: no such file or directory")
    if target.is_dir():
        splits = [target] if (target / MANIFEST).exists() else sorted(p.parent for p in target.glob(f"*/{MANIFEST}"))
        if not splits:
            raise UsageError(f"{target}: no {MANIFEST} here or in its subdirectories")
        groups: list[tuple[Manifest | ShardError | None, list[Path]]] = []
        for split in splits:
            try:
                manifest = Manifest.load(split)
            except ShardError as exc:
                groups.append((exc, []))
                continue
            groups.append((manifest, [manifest.shard_path(s) for s in manifest.shards]))
        return groups
    beside = target.parent / MANIFEST
    try:
        found: Manifest | ShardError | None = Manifest.load(beside) if beside.exists() else None
    except ShardError as exc:
        found = exc
    return [(found, [target])]


def settings(manifest: Manifest | None, args, where: Path) -> tuple[SpecialTokens, AudioSettings]:
    """From --model-config (+ --tokenizer for the token ids) if given, else from the manifest."""
    if args.model_config is not None:
        if args.tokenizer is None:
            raise UsageError("--model-config needs --tokenizer (special token ids)")
        vocabulary = load_vocabulary(args.tokenizer, args.model_config)
        return vocabulary.tokens, vocabulary.model_config.audio
    if manifest is None:
        raise UsageError(f"{where}: no {MANIFEST} beside it; pass --tokenizer and --model-config")
    return manifest.tokens, manifest.audio


# -------------------------------------------------------------------------------------------------- inspect

def render(sample: TokenizedSample, tokens: SpecialTokens, audio: AudioSettings, tokenizer=None) -> str:
    """The sample as text with learnable runs inside ⟦…⟧ and one <audio-in/out T=… …> per segment."""
    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False) if tokenizer else " ".join(f"#{i}" for i in ids)

    ids, learnable = sample.input_ids.tolist(), (sample.label_ids != IGNORE).tolist()
    segments = iter(sample.audio_codes)
    out, run, run_learnable = [], [], False

    def close_run():
        if run:
            out.append(f"{LEARNABLE[0]}{text(run)}{LEARNABLE[1]}" if run_learnable else text(run))
            run.clear()

    for token, trained in zip(ids, learnable):
        if token in (tokens.audio_in, tokens.audio_out):
            close_run()
            kind = "out" if token == tokens.audio_out else "in"
            status = (" trained" if trained else " not trained") if kind == "out" else ""
            out.append(f"<audio-{kind} T={next(segments).shape[1]}{status}>")
            continue
        if run and trained != run_learnable:
            close_run()
        run_learnable = trained
        run.append(token)
    close_run()
    return "".join(out)


def save_batch(batch, path: Path) -> None:
    tensors = {name: value.contiguous() for name, value in batch.tensors().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write(path, save(tensors, metadata={"sample_keys": json.dumps(batch.sample_keys)}))
    elif path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, sample_keys=np.array(batch.sample_keys), **{k: v.numpy() for k, v in tensors.items()})
        atomic_write(path, buffer.getvalue())
    else:
        raise UsageError(f"--dump-batch {path}: use a .npz or .safetensors file name")


def readable_samples(paths: list[Path], tokens: SpecialTokens, audio: AudioSettings):
    """(shard path, tar key, sample) for every sample that decodes; the others are printed as BAD lines."""
    for path in paths:
        try:
            for entry in shard_entries(path):
                if isinstance(entry, Stray):
                    print(f"BAD {path.name}: {entry}")
                    continue
                try:
                    sample = decode_sample(entry, tokens, audio)
                except ShardError as exc:
                    print(f"BAD {exc}")
                    continue
                yield path, entry["__key__"], sample
        except ShardError as exc:
            print(f"BAD {exc}")


def inspect(args) -> int:
    groups = find_shards(args.target)
    for manifest, _ in groups:
        if isinstance(manifest, ShardError):
            raise UsageError(str(manifest))
    tokens, audio = settings(groups[0][0], args, args.target)
    tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer is not None else None  # decodes the text
    chosen: list[TokenizedSample] = []
    stats: Counter = Counter()
    read = 0
    for path, tar_key, sample in readable_samples([p for _, paths in groups for p in paths], tokens, audio):
        if read < args.max_samples:
            stats += mask_stats(sample, tokens, audio, tokenizer)
            read += 1
        if chosen or args.key in (None, sample.key, tar_key):
            if not chosen:
                print(f"{path.name} key {tar_key!r}: sample {sample.key!r} meta {sample.meta}")
            if len(chosen) < args.batch_size:
                chosen.append(sample)
        if read >= args.max_samples and len(chosen) >= args.batch_size:
            break
    if not chosen:
        raise UsageError(f"{args.target}: no sample {args.key!r}" if args.key else f"{args.target}: no readable sample")
    print(render(chosen[0], tokens, audio, tokenizer))
    print(f"\nmasking over {read} samples (learnable audio = labels: codebooks × (T + 1) per trained segment)")
    print(table(("role", "modality", "positions", "learnable"), masking_rows(stats), right=(2, 3)))
    if args.dump_batch is not None:
        batch = Collator(tokens, audio)(chosen)
        save_batch(batch, args.dump_batch)
        print(f"\nwrote a batch of {len(chosen)} samples ({tuple(batch.input_ids.shape)}) to {args.dump_batch}")
    return 0


# ------------------------------------------------------------------------------------------------- validate

def validate_shard(path: Path, manifest: Manifest | None, tokens: SpecialTokens, audio: AudioSettings,
                   seen_keys: dict[str, str]) -> list[str]:
    if not path.exists():
        return [f"{path.name}: listed in the manifest but missing" if manifest else f"{path}: missing"]
    if not path.is_file():
        return [f"{path.name}: a directory, not a shard file" + (" (listed in the manifest)" if manifest else "")]
    problems = []
    info = next((s for s in manifest.shards if s.name == path.name), None) if manifest else None
    counts, lengths, clean, in_tar, tar_error = Counter(), [], True, 0, None
    try:
        for entry in shard_entries(path, info.samples if info else None):  # grouped as the stream groups them
            if isinstance(entry, Stray):
                problems.append(f"{path.name}: {entry}")
                continue
            position, in_tar = in_tar, in_tar + 1
            if entry["__key__"] != f"{position:06d}":
                problems.append(f"{path.name}: key {entry['__key__']!r}: expected tar key {position:06d} (positions)")
            try:
                sample = decode_sample(entry, tokens, audio)
            except ShardError as exc:
                problems.append(str(exc))
                clean = False
                continue
            if sample.key in seen_keys:
                problems.append(f"{path.name}: key {entry['__key__']!r}: sample key {sample.key!r} also in "
                                f"{seen_keys[sample.key]}")
            seen_keys[sample.key] = f"{path.name} key {entry['__key__']!r}"
            sample_count = sample_counts(sample, tokens, audio)
            counts.update(sample_count)
            lengths.append(sample_count["expanded_tokens"])
    except ShardError as exc:
        tar_error, clean = str(exc), False
    try:
        structure = tar_problem(path)  # "truncated: ..." (cut short) or "corrupt: ..." (damaged in place), where
    except OSError as exc:
        structure = f"unreadable ({exc})"
    if structure is not None:
        problems.append(f"{path.name}: {structure}")  # also the cause of the reader's error, if it had one
        clean = False
    elif tar_error is not None:
        problems.append(tar_error)
    if manifest is not None and info is None:
        problems.append(f"{path.name}: not listed in {manifest.path}")
    if info is None:
        return problems
    counts["samples"] = in_tar
    checked = COUNTS if clean else ("samples",)  # a sample that does not decode cannot be counted
    for name in checked:
        if counts[name] != getattr(info, name):
            problems.append(f"{path.name}: manifest says {name}={getattr(info, name)}, the shard has {counts[name]}")
    try:
        size, sha256 = path.stat().st_size, file_sha256(path)
    except OSError as exc:
        return problems + [f"{path.name}: cannot read it ({exc})"]
    if (size, sha256) != (info.bytes, info.sha256):
        problems.append(f"{path.name}: {size} bytes, sha256 {sha256[:12]}…; the manifest says {info.bytes} bytes, "
                        f"sha256 {info.sha256[:12]}… (changed since the build)")
    if clean:
        try:
            if manifest.lengths(info).tolist() != lengths:
                problems.append(f"{info.lengths_name}: expanded lengths differ from the shard's samples")
        except ShardError as exc:
            problems.append(str(exc))
    return problems


def validate(args) -> int:
    problems, shards, samples = [], 0, 0
    for target in args.targets:
        for manifest, paths in find_shards(target):
            if isinstance(manifest, ShardError):  # reported; a loose shard is still checked with --model-config
                problems.append(str(manifest))
                if not paths or args.model_config is None:
                    continue
                manifest = None
            tokens, audio = settings(manifest, args, target)
            seen_keys: dict[str, str] = {}
            if manifest is not None and target.is_dir():
                listed = {p.name for p in paths}
                problems += [f"{p.name}: in {p.parent} but not in its manifest"
                             for p in sorted(manifest.path.parent.glob("*.tar")) if p.name not in listed]
            for path in paths:
                problems += validate_shard(path, manifest, tokens, audio, seen_keys)
            shards += len(paths)
            samples += len(seen_keys)
    for problem in problems:
        print(f"BAD {problem}")
    print(f"{shards} shards, {samples} good samples, {len(problems)} problems")
    return 1 if problems else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog("higgs-shards", "python -m data_tools.shard_tools"),
                                description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    what = {"inspect": "render one sample with its learnable spans marked ⟦…⟧ and its audio segments, the masking "
                       "statistics per role and modality, and optionally dump the collated batch",
            "validate": "read every shard completely and report every problem by shard and key (tar integrity, "
                        "schema, codes, placeholders, the manifest); exit 1 if anything is bad"}
    for name in ("inspect", "validate"):
        cmd = sub.add_parser(name, help=what[name], description=what[name], formatter_class=HelpFormatter)
        if name == "inspect":
            cmd.add_argument("target", type=Path, help="a shard, a split directory or a build directory")
            cmd.add_argument("--key", help="sample key or tar key to show (default: the first sample)")
            cmd.add_argument("--max-samples", type=int, default=1000, help="samples the statistics cover")
            cmd.add_argument("--dump-batch", type=Path, help="write the collated batch to this .npz/.safetensors "
                                                             "(default: no dump)")
            cmd.add_argument("--batch-size", type=int, default=1, help="samples in the dumped batch")
        else:
            cmd.add_argument("targets", type=Path, nargs="+", help="split/build directories or shard files")
        cmd.add_argument("--tokenizer", help="tokenizer directory (decodes text; with --model-config: settings)")
        cmd.add_argument("--model-config", help="model config directory or config.json (default: the settings in "
                                                "the manifest beside the shards)")
    return p


@reports_errors
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "inspect":
        return inspect(args)
    return validate(args)


if __name__ == "__main__":
    sys.exit(main())
