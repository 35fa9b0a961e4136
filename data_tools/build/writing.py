"""The build's results → the splits' shards and manifests (and OUT/errors.jsonl), with the bad samples reported or
stopping the build, and the turns in roles outside system/user/assistant counted."""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from higgs_ds.data.shards import Manifest, SplitWriter, atomic_write

from .pool import Job, run_jobs
from .samples import BuildSpec

ROLES = "system/user/assistant"
SHOWN_ERRORS = 20  # skipped samples printed while building (all of them go to errors.jsonl)


@dataclass
class BuildOutcome:
    manifests: list[Manifest]
    errors: list[dict[str, Any]]
    unknown_roles: Counter  # role outside system/user/assistant → samples with a turn in it
    unknown_role_samples: int


def write_build(args, spec: BuildSpec, jobs: list[Job], directory: Path, fingerprint: dict[str, Any],
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
