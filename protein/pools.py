"""Process pools that are safe to start from any process of this project."""

from __future__ import annotations

import multiprocessing
import signal
from multiprocessing.context import BaseContext


def pool_context() -> BaseContext:
    """spawn, never fork: the caller may run torch's or Prefect's threads, and a forked child
    inherits their locks in whatever state they were (deadlocks) and their signal handlers
    (Prefect's TerminationSignal raised inside pool workers). Not forkserver either: its server
    process is started once and keeps the environment of that moment, so workers of a later pool
    would miss credentials or settings set since (S3 reads from a worker failed that way). Spawned
    workers start clean, with the caller's current environment, and import only what the pool's
    function needs (about a second each; pools are used only above a few hundred images)."""
    return multiprocessing.get_context("spawn")


def ignore_interrupts() -> None:
    """Every pool's worker initializer (or the first thing its own initializer does): Ctrl-C sends
    SIGINT to the terminal's whole process group, workers included, and each one printed a
    KeyboardInterrupt traceback before the command's `interrupted` line. The parent alone handles it
    (its KeyboardInterrupt leaves the pool's `with`, which stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
