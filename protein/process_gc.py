"""Keep Python's cyclic garbage collector off what a short-lived process keeps until it exits.

Every flow run and every `protein` command is a process of its own that imports Prefect and,
as its steps need them, torch, torchvision and Great Expectations (millions of objects: modules,
classes, functions, torch._dynamo's tables), does its work, and exits. The interpreter's final
collections at exit walk all of those objects again: 0.4 s of CPU for torch alone, about 2 s for
all four (measured here: interpreter exit against `os._exit` after the same imports). A CPU host
running a flow every few minutes, and a test suite that starts a few hundred such processes,
pay that on every one. While the process runs, each full collection walks them too: in the soak's
flow-run processes (2026-12-06, collections timed with `gc.callbacks`, medians), 2.07 s of a
CPU-host retrain's 12.4 CPU-s went to collections during its imports and steps, 1.22 s of a
GPU-host training's 6.2, 0.35 s of a quiet nightly's 2.1; with the freezes after imports below,
1.21, 0.70 and 0.22 s.

`gc.freeze()` moves every object alive now into a generation the collector never visits. Called
as the process exits, it skips that walk and nothing else: the other atexit handlers still run
(logging still flushes), and the interpreter still frees the modules' objects by reference
counting as it tears them down. What it gives up: objects already unreachable inside reference
cycles are not finalized at exit, which Python never promised anyway (a `__del__` that must run
is a bug waiting for a SIGKILL).

Right after a heavy library's first import, what is alive is that library's module state, which
lives as long as the process does anyway: frozen then, no later collection walks it again. The
collector still runs and still collects everything made afterwards (a training loop's garbage
included); an object alive at the freeze that later becomes cyclic garbage is never collected,
which at those moments is a few stray import-time objects, once per process.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import sys
import threading
from collections.abc import Iterable

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


def import_frozen(modules: Iterable[str]) -> bool:
    """Import ``modules`` and, if that loaded any of them for the first time in this process,
    freeze what is alive now; True if it froze. Called where a step first needs a heavy library
    (torch, Great Expectations): a process that already has them freezes nothing again."""
    names = list(modules)
    new = [name for name in names if name not in sys.modules]
    for name in names:
        importlib.import_module(name)
    if new:
        gc.freeze()
    return bool(new)
