"""Importing Great Expectations without the libraries it never uses here.

GX 1.x imports `scipy.stats` (~490 modules, 0.7 of its ~2.7 CPU-s here) and `altair` while it
imports itself, for three Expectations this project does not use: the KL-divergence Expectation
(`stats.entropy`, altair's charts) and the two Kolmogorov-Smirnov metrics (`stats.kstest`), which
use them only inside their functions. Every process that validates (a CPU host's retrain that
finds new data, `protein validate`, a push's run) paid for them before its first check.
`defer_import` puts a module in `sys.modules` whose code runs on the first attribute anyone reads
from it that the module does not have yet, so a suite that does use those Expectations gets the
real modules, a moment later, and nothing else changes.

Why not the standard library's `importlib.util.LazyLoader`: its module loads on *any* attribute,
`__file__` included, and `inspect.getmodule` reads `__file__` of every module in `sys.modules`; torch
calls it while it imports, so a retrain that validated and then imported torch to score loaded the
statistics after all. Here the import system's own attributes (`__file__`, `__spec__`, `__path__`...)
are set from the module's spec up front and answer without running it. A thread that reads an
attribute while another runs the module's code waits for it to finish (docs/validation.md, "Cost").
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Any

# What GX imports at its own import and calls only inside the functions of Expectations we never run.
GX_DEFERRED = ("scipy.stats", "altair")


def defer_import(name: str) -> bool:
    """Register module ``name`` in `sys.modules` without running its code: it runs on the first read
    of an attribute the module has not defined yet (its dunders from the spec answer at once). Its
    parent package is imported now. False, and nothing done, if it is imported already or is not
    installed."""
    if name in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return False
    if spec is None or spec.loader is None:
        return False
    loader = spec.loader
    module = importlib.util.module_from_spec(spec)  # __name__, __file__, __spec__, __path__, __loader__
    lock = threading.RLock()
    running = False  # read and written under the lock only

    def load(attribute: str) -> Any:
        nonlocal running
        with lock:  # another thread's first read waits here until the code has run
            if module.__dict__.get("__getattr__") is load:
                if running:  # read by the module's own code while it runs: not there yet
                    raise AttributeError(f"partially initialized module {name!r} has no attribute {attribute!r}")
                running = True
                try:
                    loader.exec_module(module)  # runs in module.__dict__; may define its own __getattr__
                except BaseException:  # as a failed import, it leaves nothing behind
                    sys.modules.pop(name, None)
                    if parent and getattr(sys.modules.get(parent), child, None) is module:
                        delattr(sys.modules[parent], child)
                    raise
                finally:
                    running = False
                if module.__dict__.get("__getattr__") is load:
                    del module.__dict__["__getattr__"]
        return getattr(module, attribute)

    parent, _, child = name.rpartition(".")
    module.__getattr__ = load  # type: ignore[method-assign]  # PEP 562: only for names not defined
    sys.modules[name] = module
    if parent:
        setattr(sys.modules[parent], child, module)  # as the import system binds a loaded submodule
    return True


def defer_what_gx_never_runs() -> None:
    """Defer GX_DEFERRED: call before Great Expectations is first imported in a process."""
    for name in GX_DEFERRED:
        defer_import(name)


def import_great_expectations() -> ModuleType:
    """`great_expectations`, imported with GX_DEFERRED deferred and GX's analytics off."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    defer_what_gx_never_runs()
    return importlib.import_module("great_expectations")
