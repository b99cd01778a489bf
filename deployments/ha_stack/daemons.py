"""The processes of the stack: each one a Daemon in a session of its own, started on a port picked
free and held by retrying (a port taken between the pick and the bind makes that process exit, and
it is started again on another)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

PREFECT = Path(sys.executable).parent / "prefect"
START_TIMEOUT_S = 120.0
PORT_ATTEMPTS = 5
# The words each program logs when its port was taken between the pick and its bind.
PORT_TAKEN = ("Address already in use", "address already in use", "could not bind", "is already in use")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """One server process in a session of its own (stopping it stops its children), output to
    a log file: a pipe nobody reads would fill and block it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
                 port: int = 0) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.started_at = time.monotonic()
        self.ready_at: float | None = None  # when start_listening found it answering
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=log_dir,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
        """``sig`` to the process group, SIGKILL after ``grace_s``; returns once it has exited."""
        if self.alive():
            self.send(sig)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.process.wait(timeout=30)
        self.send(signal.SIGKILL)  # children left in the group (uvicorn's, nginx's workers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} (last {chars} chars) ---\n{self.log()[-chars:]}"


class StartError(RuntimeError):
    pass


def start_listening(name: str, launch: Callable[[int], Daemon], ready: Callable[[int], bool],
                    port: int | None = None, timeout_s: float = START_TIMEOUT_S) -> Daemon:
    """Start ``launch(port)`` until ``ready(port)``; a daemon that exits because its port was
    taken meanwhile is started again on another free port (``port``, when given, is kept)."""
    for _ in range(PORT_ATTEMPTS):
        chosen = port or free_port()
        daemon = launch(chosen)
        deadline = time.monotonic() + timeout_s
        while daemon.alive() and not ready(chosen):
            if time.monotonic() > deadline:
                daemon.stop(signal.SIGKILL)
                raise StartError(f"{name} not ready on port {chosen} within {timeout_s:.0f}s\n{daemon.log_tail()}")
            time.sleep(0.2)
        if daemon.alive():
            daemon.ready_at = time.monotonic()
            return daemon
        if not any(words in daemon.log() for words in PORT_TAKEN):
            raise StartError(f"{name} exited with {daemon.process.returncode} while starting\n{daemon.log_tail()}")
        time.sleep(0.5)
    raise StartError(f"{name}: no free port after {PORT_ATTEMPTS} attempts\n{daemon.log_tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
