"""A package's names that load their module on first use (PEP 562), for the packages whose heavy
parts (numpy, pandas, Pillow, Great Expectations) a flow-run process should not import before its
flow needs them."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, namespace: dict[str, Any], modules: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's ``__getattr__``: ``modules`` maps each lazy name to its submodule; the first
    lookup imports ``package.submodule``, keeps the value in the package's ``namespace`` (later
    lookups never come back here) and returns it."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    return __getattr__
