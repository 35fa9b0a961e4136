"""What the data tools' command lines share: the name they were called by, help that shows every default, and user
errors reported as one `error: ` line."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

from higgs_ds.cli import HelpFormatter  # noqa: F401 - the tools' formatter
from higgs_ds.vocabulary import VocabularyError


class UsageError(Exception):
    """Something the user gave or must fix (a path, an option, the output folder); the message is one line."""


def prog(script: str, module: str) -> str:
    """How the command was called: its console script (pyproject.toml) or `python -m`."""
    return script if Path(sys.argv[0]).name == script else module


def reports_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """A tool's `main` whose user errors (UsageError, VocabularyError) end the command with one line,
    `error: <message>`, on stderr and exit status 1."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except (UsageError, VocabularyError) as exc:
            raise SystemExit(f"error: {exc}") from None
    return run
