"""Reading shard tars: raw samples grouped by webdataset, and a check of the tar's block structure."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator

from ..packing import round_up
from .location import FetchError, is_remote, name_of, open_stream
from .sample_codec import ShardError

BLOCK = tarfile.BLOCKSIZE


def read_shard(path: str | Path) -> Iterator[dict[str, Any]]:  # a local path or a URL (location.py)
    """Raw samples of one shard in tar order, grouped by webdataset. A tar-level error (a file that ends inside a
    member, a duplicate field, a file that is not a tar) raises ShardError after the samples read before it.
    Python's tar reader stops silently at a member boundary where the file is cut short or a header is
    overwritten, so such a tar reads as shorter: compare with the manifest; `tar_problem` says which it is."""
    remote, name = is_remote(path), name_of(path)
    try:
        with open_stream(path) as stream:
            files = ({**f, "__url__": str(path)} for f in tar_file_iterator(stream))
            yield from group_by_keys(files)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        message = str(exc).split(" @ <")[0]  # webdataset appends the stream's repr
        if remote and isinstance(exc, OSError):  # the fetch itself failed (curl's retries included): stop the run
            raise FetchError(f"{path}: fetch failed while reading ({message})") from exc
        if isinstance(exc, tarfile.ReadError) and message == "unexpected end of data":
            raise ShardError(f"{name}: truncated tar (the file ends inside a member)") from exc
        raise ShardError(f"{name}: unreadable tar ({type(exc).__name__}: {message})") from exc


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
