"""Keep Python's cyclic garbage collector off what a short-lived process keeps until it exits.

Every flow run and every `protein` command is a process of its own that imports Prefect and,
as its steps need them, torch, torchvision and Great Expectations (millions of objects: modules,
classes, functions, torch._dynamo's tables), does its work, and exits. The interpreter's final
collections at exit walk all of those objects again: 0.4 s of CPU for torch alone, about 2 s for
all four (measured here: interpreter exit against `os._exit` after the same imports). A CPU host
running a flow every few minutes, and a test suite that starts a few hundred such processes,
pay that on every one.

`gc.freeze()` moves every object alive now into a generation the collector never visits. Called
as the process exits, it skips that walk and nothing else: the other atexit handlers still run
(logging still flushes), and the interpreter still frees the modules' objects by reference
counting as it tears them down. What it gives up: objects already unreachable inside reference
cycles are not finalized at exit, which Python never promised anyway (a `__del__` that must run
is a bug waiting for a SIGKILL). While the process works, the collector runs as before.
"""

from __future__ import annotations

import atexit
import gc
import threading

_registered = False
_lock = threading.Lock()


def freeze_at_exit() -> None:
    """Skip the collector's walk over the process's objects when the interpreter exits (once per
    process; later calls do nothing). The freeze runs as an atexit handler, so it happens after
    the process's last work, whichever way it ends short of a signal."""
    global _registered
    with _lock:
        if not _registered:
            atexit.register(gc.freeze)
            _registered = True

