"""Process pools that are safe to start from any process of this project."""

from __future__ import annotations

import multiprocessing
from multiprocessing.context import BaseContext


def pool_context() -> BaseContext:
    """forkserver (spawn where there is none), never fork: the caller may run torch's or Prefect's
    threads, and a forked child inherits their locks in whatever state they were (deadlocks) and
    their signal handlers (Prefect's TerminationSignal raised inside pool workers). Workers start
    from a clean server process and import only what the pool's function needs."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
