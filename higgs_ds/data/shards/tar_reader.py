"""Reading shard tars: raw samples grouped by webdataset, and an end-of-archive check."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any, Iterator

from webdataset.tariterators import group_by_keys, tar_file_iterator

from .sample_codec import ShardError


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


