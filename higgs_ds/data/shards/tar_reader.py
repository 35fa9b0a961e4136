"""Reading shard tars: tar members grouped into raw samples (the one grouping the stream and `shard_tools validate`
share), and a check of the tar's block structure."""
from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from webdataset.tariterators import tar_file_iterator

from ..packing import round_up
from .location import FetchError, is_remote, name_of, open_stream
from .sample_codec import FIELDS, ShardError

BLOCK = tarfile.BLOCKSIZE
_WRITTEN = tuple(sorted(FIELDS))  # webdataset's TarWriter writes a sample's fields in sorted order


@dataclass(frozen=True)
class Stray:
    """Tar members that belong to no sample: ignored; a reader counts them as len(names) stray members."""

    names: tuple[str, ...]
    why: str

    def __str__(self) -> str:
        shown = ", ".join(repr(name[:40]) for name in self.names[:3])
        more = f" and {len(self.names) - 3} more" if len(self.names) > 3 else ""
        return f"tar member{'s' if len(self.names) > 1 else ''} {shown}{more} {self.why}; ignored"


def shard_entries(path: str | Path, samples: int | None = None) -> Iterator[dict[str, Any] | Stray]:
    """A shard's raw samples ({"__key__", "__url__", field: bytes}) and `Stray`s, grouped by `group_members`;
    `samples`: the manifest's count, which bounds the sample positions (None: any position). A tar-level error (a
    file that ends inside a member, a file that is not a tar) raises ShardError after the entries read before it.
    Python's tar reader stops silently at a member boundary where the file is cut short or a header is
    overwritten, so such a tar reads as shorter: compare with the manifest; `tar_problem` says which it is."""
    remote, name = is_remote(path), name_of(path)
    try:
        with open_stream(path) as stream:
            members = ((f["fname"], f["data"]) for f in tar_file_iterator(stream))
            yield from group_members(members, str(path), samples)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        message = str(exc).split(" @ <")[0]  # webdataset appends the stream's repr
        if remote and isinstance(exc, OSError):  # the fetch itself failed (curl's retries included): stop the run
            raise FetchError(f"{path}: fetch failed while reading ({message})") from exc
        if isinstance(exc, tarfile.ReadError) and message == "unexpected end of data":
            raise ShardError(f"{name}: truncated tar (the file ends inside a member)") from exc
        raise ShardError(f"{name}: unreadable tar ({type(exc).__name__}: {message})") from exc


def read_shard(path: str | Path, samples: int | None = None) -> Iterator[dict[str, Any]]:  # a path or a URL
    """The raw samples of `shard_entries`, strays left out."""
    return (entry for entry in shard_entries(path, samples) if not isinstance(entry, Stray))


def group_members(members: Iterable[tuple[str, bytes]], url: str, samples: int | None) -> Iterator[dict | Stray]:
    """Tar members (name, bytes) → raw samples, each sample position at most once, and strays.

    The writer puts a sample's members together, fields in sorted order, under the tar key `{position:06d}`. A run
    is consecutive members of one key in that order; a member planted inside a sample splits it into two runs,
    which join again. A sample is yielded when it has every field and the run just read holds its last one, so
    that a planted copy read earlier never completes it. Strays: members whose key is no sample position (below
    `samples`) or whose field is no sample field; members of a sample already yielded; and the earlier of two
    copies of a field (a copy planted before the real member; a whole run of every field replaces all that was
    read of its key before). Incomplete samples are yielded at the end of the tar (they fail decoding: missing
    fields); not after a tar error, which stops the reading. Only a copy planted right beside the sample's own
    members can be taken for the real one."""
    done: set[int] = set()
    partial: dict[int, dict[str, Any]] = {}  # incomplete samples by position, in the order first seen
    key, run = None, {}  # the current run: field → bytes, in tar order

    def stray(names: list[str], why: str) -> Stray:
        return Stray(tuple(names), why.format(s="s" if len(names) == 1 else "", are="is" if len(names) == 1 else
                                              "are"))

    def close(key: str, run: dict[str, bytes]) -> Iterator[dict | Stray]:
        position = int(key) if key.isascii() and key.isdigit() else -1
        if position < 0 or (samples is not None and position >= samples):
            bound = f" (0..{samples - 1})" if samples is not None else ""
            yield stray([_name(key, f) for f in run], f"name{{s}} no sample position{bound} as tar key")
            return
        unknown = [f for f in run if f not in FIELDS]
        if unknown:
            yield stray([_name(key, f) for f in unknown], f"{{are}} no sample field ({', '.join(FIELDS)})")
            run = {f: data for f, data in run.items() if f in FIELDS}
        if not run:
            return
        if position in done:
            yield stray([_name(key, f) for f in run], f"repeat{{s}} sample {key!r}, already read")
            return
        sample = partial.pop(position, None)
        if sample is not None:
            replaced = [f for f in sample if not f.startswith("__") and (f in run or len(run) == len(FIELDS))]
            if replaced:
                yield stray([_name(key, f) for f in replaced], f"precede{{s}} another copy in sample {key!r}")
        if sample is None or len(run) == len(FIELDS):
            sample = {"__key__": key, "__url__": url}
        sample.update(run)
        if _WRITTEN[-1] in run and all(f in sample for f in FIELDS):
            done.add(position)
            yield sample
        else:
            partial[position] = sample

    for name, data in members:
        member_key, _, field = name.partition(".")
        if run and (member_key != key or field <= list(run)[-1]):
            yield from close(key, run)
            run = {}
        key, run[field] = member_key, data
        if field == _WRITTEN[-1] and len(run) == len(FIELDS) and all(f in run for f in FIELDS):
            yield from close(key, run)  # complete: delivered now, not when the next member arrives
            run = {}
    if run:
        yield from close(key, run)
    yield from partial.values()


def _name(key: str, field: str) -> str:
    return f"{key}.{field}" if field else key


def tar_problem(path: str | Path) -> str | None:
    """None when the tar's headers are intact from the first member to the end-of-archive marker (two zero blocks,
    nothing but zeros after them). Otherwise one phrase: "truncated: ..." when the file ends early (at a member
    boundary, inside a header or inside a member's data), "corrupt: ..." when the blocks are damaged in place (a
    header that does not parse, data after the end marker), naming the offset and the member before it. Walks the
    headers itself, reading only them (and, at the end, the trailing zeros)."""
    with open(path, "rb") as stream:
        size = stream.seek(0, 2)
        offset, last = 0, None
        while True:
            after = f"after member {last!r}" if last is not None else "the first header"
            stream.seek(offset)
            header = stream.read(BLOCK)
            if len(header) < BLOCK:
                place = "at" if not header else "inside the header at"
                return f"truncated: the file ends {place} offset {offset} ({after}) without the end-of-archive marker"
            if not any(header):
                return _check_end(stream, offset, size, after)
            try:
                info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
            except (tarfile.HeaderError, ValueError) as exc:
                return (f"corrupt: invalid tar header at offset {offset} ({after}): {exc or type(exc).__name__}; "
                        "the members from there on cannot be read")
            end = offset + BLOCK + round_up(info.size, BLOCK)
            if end > size:
                return (f"truncated: member {info.name!r} at offset {offset} needs {end - offset} bytes, the file "
                        f"ends at {size}")
            offset, last = end, info.name


def _check_end(stream, offset: int, size: int, after: str) -> str | None:
    """The zero block at `offset` must be followed by a second one and by nothing but zeros (record padding)."""
    second = stream.read(BLOCK)
    if len(second) < BLOCK:
        return (f"truncated: the file ends after one zero block at offset {offset} ({after}), without the second "
                "block of the end-of-archive marker")
    if any(second):
        return (f"corrupt: a zero block at offset {offset} ({after}) followed by data (a header overwritten with "
                "zeros?); the members from there on cannot be read")
    position = offset + 2 * BLOCK
    while chunk := stream.read(1 << 20):
        if any(chunk):
            first = position + next(i for i, byte in enumerate(chunk) if byte)
            return (f"corrupt: data at offset {first} after the end-of-archive marker at offset {offset} ({after}): "
                    "blocks overwritten with zeros, or data appended")
        position += len(chunk)
    return None


def tar_complete(path: str | Path) -> bool:
    """True when the tar is intact up to its end-of-archive marker (see `tar_problem`)."""
    try:
        return tar_problem(path) is None
    except OSError:
        return False
