"""Where a split lives: a local directory, or a URL that webdataset's opener reads (`https://…`, `http://…`, or
`pipe:CMD` for object-store CLIs, e.g. `pipe:aws s3 cp s3://bucket/split/{name} -`). The manifest, the lengths
sidecars and the tars are all read through here. Remote reads are retried (webdataset's curl already retries
transient HTTP errors; each fetch is tried `ATTEMPTS` times); a fetch that still fails raises FetchError naming the
URL, which stops the run instead of being counted as one bad shard."""
from __future__ import annotations

import time
from pathlib import Path
from typing import BinaryIO

ATTEMPTS = 3


class FetchError(RuntimeError):
    """A remote manifest, sidecar or shard that could not be fetched; the message names the URL."""


Location = str | Path


def is_remote(location: Location) -> bool:
    text = str(location)
    return "://" in text and not text.startswith("file://") or text.startswith("pipe:")


def join(base: Location, name: str) -> Location:
    """`name` inside the split at `base`; a `pipe:` base holds `{name}` where the file name goes."""
    if not is_remote(base):
        return Path(base) / name
    text = str(base)
    return text.replace("{name}", name) if "{name}" in text else text.rstrip("/") + "/" + name


def _open_remote(url: str) -> BinaryIO:
    from webdataset.gopen import gopen

    return gopen(url, "rb")


def read_bytes(location: Location) -> bytes:
    """The whole file (OSError for a local one that cannot be read; FetchError for a remote one)."""
    if not is_remote(location):
        return Path(location).read_bytes()
    error = None
    for attempt in range(ATTEMPTS):
        try:
            with _open_remote(str(location)) as stream:
                return stream.read()
        except (OSError, ValueError) as exc:
            error = exc
            time.sleep(0.5 * 2 ** attempt)
    raise FetchError(f"{location}: could not fetch after {ATTEMPTS} attempts ({error})")


def open_stream(location: Location) -> BinaryIO:
    """A binary stream to read once, front to back (a tar)."""
    if not is_remote(location):
        return open(location, "rb")
    try:
        return _open_remote(str(location))
    except (OSError, ValueError) as exc:
        raise FetchError(f"{location}: could not open ({exc})") from exc


def name_of(location: Location) -> str:
    return Path(str(location).split("?")[0]).name
