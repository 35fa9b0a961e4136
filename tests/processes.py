"""Multi-process commands in tests: each runs in its own process group, under a timeout, and leaves nothing behind
(on a timeout, and after it ends, the whole group is killed: DeepSpeed's ranks, DataLoader workers, torchrun's
children). `run` waits for a command; `start` + `wait` (or `kill_group`) for a test that acts while it runs.
The ports `free_port` hands out are remembered, so that `remove_shared_memory` removes the /dev/shm buffers of
those launches and no other job's."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

SHARED_MEMORY = Path("/dev/shm")
_PORTS: set[int] = set()  # every port free_port handed out since the last remove_shared_memory


def free_port() -> int:
    """A port nothing listens on now: launches never meet another job's rendezvous (a fixed port can, and then
    hangs instead of failing)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _PORTS.add(port)
    return port


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def start(command: list[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a new session (its own process group: `kill_group` reaches every process it starts),
    stdout and stderr piped as text unless given (stderr=subprocess.STDOUT interleaves them). Then `wait` for it, or
    `kill_group` it."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    kwargs.setdefault("stderr", subprocess.PIPE)
    kwargs.setdefault("text", True)
    return subprocess.Popen(command, start_new_session=True, preexec_fn=_default_interrupt, **kwargs)


def _default_interrupt() -> None:
    """Ctrl-C's default in the child, whatever the suite inherited: a shell starts background jobs with SIGINT
    ignored, and a Python started so never turns SIGINT into KeyboardInterrupt (the Ctrl-C tests would not see it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait(process: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    """A started command's exit code and output; a timeout fails the test (a hang) after killing it, with the end
    of what it printed."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        out, err = process.communicate()
        printed = "\n".join(_tail(text) for text in (out, err) if text)
        pytest.fail(f"timed out after {timeout} s (a hang?): {process.args}\n{printed}")
    finally:
        kill_group(process)  # stragglers of a finished command
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run(command: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output, text) in a new session; a timeout fails the test (a hang) after killing it."""
    kwargs.pop("capture_output", None), kwargs.pop("text", None)  # always both
    return wait(start(command, **kwargs), timeout)


def _tail(output: str | bytes, chars: int = 4000) -> str:
    return (output.decode(errors="replace") if isinstance(output, bytes) else output)[-chars:]


def remove_shared_memory() -> None:
    """Remove DeepSpeed's CPU all-reduce buffers of the launches on the ports `free_port` handed out. shm.cpp names
    them deepspeed_allreduce_buffer_{uid}_{master addr}_{master port}_{local rank} (≈ 66 MiB of RAM each); the
    trainer's ranks unlink theirs as soon as the process group forms, a launch killed before that cannot. Buffers
    on other ports (other jobs') stay. Call only once those launches have ended."""
    prefix = f"deepspeed_allreduce_buffer_{os.getuid()}_"
    for path in SHARED_MEMORY.glob(f"{prefix}*"):
        parts = path.name[len(prefix):].rsplit("_", 2)  # [master addr, master port, local rank]
        if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) in _PORTS:
            path.unlink(missing_ok=True)
    _PORTS.clear()
