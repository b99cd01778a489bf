"""protein.process_gc: a flow run's or a command's process skips the collector's walk at exit."""

from __future__ import annotations

import gc
import sys
from pathlib import Path
from typing import Any

import pytest

from protein import process_gc
from tests.conftest import ProteinProcess

# Registered before the entry point is imported, so it runs after the entry point's own atexit
# handler (atexit runs last-registered first) and prints what the collector was left to walk.
PROBE = "import atexit, gc\natexit.register(lambda: print('frozen at exit:', gc.get_freeze_count()))\n"


def test_the_freeze_is_registered_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    registered: list[Any] = []
    monkeypatch.setattr(process_gc, "_registered", False)
    monkeypatch.setattr(process_gc.atexit, "register", registered.append)

    process_gc.freeze_at_exit()
    process_gc.freeze_at_exit()

    assert registered == [gc.freeze]


@pytest.mark.parametrize("entry_point", [
    "import flows.retrain",  # what Prefect's engine does in a flow run's process
    "from protein.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",  # `protein ...`
])
def test_a_flow_run_or_a_command_leaves_the_collector_nothing_to_walk_at_exit(protein_process: ProteinProcess,
                                                                                 entry_point: str) -> None:
    done = protein_process.python(PROBE + entry_point)

    assert done.returncode == 0, done.stderr
    frozen = int(done.stdout.rsplit("frozen at exit:", 1)[1])
    # the project's and its libraries' objects (Prefect's too in a flow run): an empty interpreter has none
    assert frozen > 10_000, done.stdout


def test_the_probe_sees_an_interpreter_that_freezes_nothing(protein_process: ProteinProcess) -> None:
    done = protein_process.python(PROBE + "import json")

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "frozen at exit: 0"


def test_a_first_import_freezes_and_an_import_already_done_does_not(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "process_gc_probe.py").write_text("STATE = {'loaded': True}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "process_gc_probe", raising=False)
    freezes: list[None] = []
    monkeypatch.setattr(process_gc.gc, "freeze", lambda: freezes.append(None))

    assert process_gc.import_frozen(["json", "process_gc_probe"]) is True
    assert sys.modules["process_gc_probe"].STATE == {"loaded": True} and len(freezes) == 1
    assert process_gc.import_frozen(["json", "process_gc_probe"]) is False
    assert len(freezes) == 1


def test_a_flow_runs_process_has_prefect_frozen_once_the_flow_is_imported(protein_process: ProteinProcess) -> None:
    done = protein_process.python("import gc, prefect\nbefore = gc.get_freeze_count()\nimport flows.retrain\n"
                                  "print(before, gc.get_freeze_count())")

    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split()[-2:])
    assert before == 0 and after > 100_000, done.stdout
