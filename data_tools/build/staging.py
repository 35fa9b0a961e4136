"""Where a build is written until it succeeded: OUT is left as it was by a failed or interrupted build."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..cli import UsageError


def output_dir(out: Path) -> Path:
    """The real path OUT will be renamed to; refuses an OUT that holds anything."""
    try:
        if out.exists() or out.is_symlink():
            if not out.is_dir():
                raise UsageError(f"--out {out}: exists and is not a directory")
            if any(out.iterdir()):
                raise UsageError(f"--out {out}: exists and is not empty; refusing to mix builds")
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc}") from None
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
            raise UsageError(f"--out {self.out}: cannot create {self.path} ({exc})") from None
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
            raise UsageError(f"--out {self.out}: cannot move the finished build into place ({exc}); it is in "
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
