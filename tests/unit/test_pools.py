"""Pool workers must not inherit the parent's signal handlers (Prefect installs one for SIGTERM,
which turned every pool shutdown into TerminationSignal tracebacks in the run log)."""

from __future__ import annotations

import signal

from protein.pools import pool_context


def sigterm_handler_name(_: int) -> str:
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__name__", str(handler))


def parents_handler(signum: int, frame: object) -> None:  # stands in for Prefect's handler
    raise RuntimeError("the parent's SIGTERM handler ran in a pool worker")


def test_pool_workers_start_without_the_parents_sigterm_handler() -> None:
    previous = signal.signal(signal.SIGTERM, parents_handler)
    try:
        with pool_context().Pool(1) as pool:
            in_worker = pool.map(sigterm_handler_name, [0])[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_worker != "parents_handler"
