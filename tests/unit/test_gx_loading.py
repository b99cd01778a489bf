"""A module deferred until first use (protein/validation/gx_loading.py): Great Expectations imports
`scipy.stats` for Expectations this project never runs; deferring it saves ~1 CPU-s in every process
that validates. These tests defer a throw-away package of their own, whose code counts its runs."""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protein.validation.gx_loading import defer_import
from tests.helpers import run_in_threads

MODULE_CODE = """
import time
from {parent} import record
record.append("ran")
time.sleep({sleep_s})
VALUE = 42
{extra}
"""


class Deferred:
    def __init__(self, root: Path, sleep_s: float = 0.0, extra: str = "") -> None:
        self.parent = f"deferpkg_{uuid.uuid4().hex[:8]}"
        self.name = f"{self.parent}.stats"
        package = root / self.parent
        (package / "stats").mkdir(parents=True)
        (package / "__init__.py").write_text("record = []\n")
        (package / "stats" / "__init__.py").write_text(
            MODULE_CODE.format(parent=self.parent, sleep_s=sleep_s, extra=extra))
        (package / "stats" / "_inner.py").write_text("INNER = 7\n")
        self.record: list[str] = importlib.import_module(self.parent).record


@pytest.fixture
def deferred_package(tmp_path: Path) -> Iterator[Callable[..., Deferred]]:
    made: list[Deferred] = []

    def make(sleep_s: float = 0.0, extra: str = "") -> Deferred:
        made.append(Deferred(tmp_path, sleep_s, extra))
        return made[-1]

    sys.path.insert(0, str(tmp_path))
    try:
        yield make
    finally:
        sys.path.remove(str(tmp_path))
        for package in made:
            for name in [n for n in sys.modules if n == package.parent or n.startswith(package.parent + ".")]:
                del sys.modules[name]


def test_a_deferred_module_runs_on_its_first_attribute_and_once(deferred_package) -> None:
    package = deferred_package()
    assert defer_import(package.name)
    module = sys.modules[package.name]
    assert package.record == []
    # What the import system and `inspect.getmodule` read of every module answers without running it:
    # torch reads `__file__` of all of sys.modules while it imports (the standard LazyLoader loads there).
    assert module.__name__ == package.name and module.__file__.endswith("__init__.py")
    assert module.__spec__.name == package.name and module.__path__
    inspect.getmodule(inspect.currentframe())
    assert importlib.import_module(package.name) is module
    assert importlib.import_module(package.parent).stats is module  # `from scipy import stats`
    assert package.record == [], "the module's code ran before anything read from it"

    assert module.VALUE == 42
    assert module.VALUE == 42 and package.record == ["ran"]
    from_import = {}
    exec(f"from {package.name} import VALUE", from_import)
    assert from_import["VALUE"] == 42 and package.record == ["ran"]
    with pytest.raises(AttributeError):
        module.NOT_THERE  # noqa: B018


def test_a_submodule_imports_without_running_its_package(deferred_package) -> None:
    package = deferred_package()
    defer_import(package.name)
    assert importlib.import_module(f"{package.name}._inner").INNER == 7
    assert package.record == []
    assert sys.modules[package.name].VALUE == 42 and package.record == ["ran"]


def test_the_modules_own_getattr_is_kept(deferred_package) -> None:
    package = deferred_package(extra="def __getattr__(name):\n    return f'own {name}'\n")
    defer_import(package.name)
    module = sys.modules[package.name]
    assert module.VALUE == 42
    assert module.anything == "own anything"


def test_a_module_that_fails_leaves_nothing_registered(deferred_package) -> None:
    package = deferred_package(extra="raise RuntimeError('broken module')\n")
    defer_import(package.name)
    with pytest.raises(RuntimeError, match="broken module"):
        sys.modules[package.name].VALUE  # noqa: B018
    assert package.name not in sys.modules
    assert not hasattr(sys.modules[package.parent], "stats")


def test_threads_reading_first_at_once_wait_for_one_run(deferred_package) -> None:
    package = deferred_package(sleep_s=0.3)
    defer_import(package.name)
    module = sys.modules[package.name]
    seen: list[object] = []
    start = threading.Barrier(4)

    def read() -> None:
        start.wait()
        seen.append(module.VALUE)

    errors = run_in_threads(read, 4, 10)  # kept and asserted on, not swallowed
    assert errors == [] and seen == [42] * 4
    assert package.record == ["ran"]


def test_nothing_is_deferred_that_is_imported_already_or_not_installed(deferred_package) -> None:
    package = deferred_package()
    importlib.import_module(package.name)
    assert package.record == ["ran"]
    assert not defer_import(package.name)
    assert not defer_import(f"{package.parent}_absent.stats")
    assert not defer_import(f"{package.parent}.absent")
    assert f"{package.parent}.absent" not in sys.modules
