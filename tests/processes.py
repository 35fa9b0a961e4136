"""Multi-process commands in tests: each runs in its own process group, under a timeout, and leaves nothing behind
(on a timeout, and after it ends, the whole group is killed: DeepSpeed's ranks, DataLoader workers, torchrun's
children)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest


def free_port() -> int:
    """A port nothing listens on now: launches never meet another job's rendezvous (a fixed port can, and then
    hangs instead of failing)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output, text) in a new session; a timeout fails the test (a hang) after killing it."""
    kwargs.pop("capture_output", None), kwargs.pop("text", None)  # always both
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **kwargs)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        process.communicate()
        pytest.fail(f"timed out after {timeout} s (a hang?): {command}")
    finally:
        kill_group(process)  # stragglers of a finished command
    return subprocess.CompletedProcess(command, process.returncode, out, err)
