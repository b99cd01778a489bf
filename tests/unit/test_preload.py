"""protein.preload: modules imported in a background thread, failures left to the step that needs them."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from protein.preload import GATE_REPORT_MODULES, SCORING_MODULES, preload


def write_module(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


def test_modules_are_imported_in_a_thread_of_their_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "preload_probe_a", """
        import threading
        LOADED_IN = threading.current_thread().name
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "preload_probe_a", raising=False)

    thread = preload(["preload_probe_a"])
    thread.join(timeout=30)

    assert not thread.is_alive() and thread.daemon
    assert sys.modules["preload_probe_a"].LOADED_IN == "protein-preload"


def test_a_module_that_fails_to_import_is_logged_and_the_rest_still_load(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    write_module(tmp_path, "preload_probe_broken", "raise RuntimeError('no such library here')\n")
    write_module(tmp_path, "preload_probe_b", "VALUE = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("preload_probe_broken", "preload_probe_b"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    caplog.set_level(logging.DEBUG, logger="protein.preload")

    thread = preload(["preload_probe_broken", "preload_probe_b"])
    thread.join(timeout=30)

    assert sys.modules["preload_probe_b"].VALUE == 2
    assert "preload_probe_broken" not in sys.modules
    assert "preloading preload_probe_broken failed: RuntimeError: no such library here" in caplog.text


def test_the_scoring_modules_exist() -> None:
    """A module renamed in the library would otherwise be preloaded in vain, silently."""
    import importlib.util

    assert [m for m in SCORING_MODULES + GATE_REPORT_MODULES if importlib.util.find_spec(m) is None] == []


def loaded_after_the_preload(protein_process: Any, preloaded: str, step: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of ``packages`` that ``step`` (Python code) still imports in a fresh process
    after it imported the modules of ``protein.preload.<preloaded>``, as the preload thread does."""
    code = (f"import importlib, json, sys; from protein.preload import {preloaded}; "
            f"[importlib.import_module(m) for m in {preloaded}]; before = set(sys.modules); {step}; "
            f"print(json.dumps(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in {packages!r})))")
    result = protein_process.python(code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_scoring_after_the_preload_imports_nothing_more_of_torch(protein_process: Any) -> None:
    """What the retrain's scoring imports, the preload has imported: building the model (its first
    step) loads no torch or torchvision module of its own. The builder imports torchvision inside
    the function, so preloading the builder's module alone would leave ~1.5 s on the scoring path."""
    step = "from protein.modeling.model import build_model; build_model('resnet18')"
    assert loaded_after_the_preload(protein_process, "SCORING_MODULES", step, ("torch", "torchvision")) == []


def test_the_gate_plot_after_the_preload_imports_nothing_more_of_matplotlib(protein_process: Any) -> None:
    """The gate report's plot, drawn as the retrain draws it after the preload (headless, so on the Agg
    backend it selects itself), loads no matplotlib module of its own."""
    step = ("from protein.evaluation.report import training_plot_png; "
            "png = training_plot_png([{'epoch': 1, 'train_loss': 0.5, 'holdout_loss': 0.6, "
            "'holdout_f1_samples': 0.3}], [0.1] * 10, [0.2] * 10); import matplotlib; "
            "assert png.startswith(b'\\x89PNG') and matplotlib.get_backend().lower() == 'agg'")
    assert loaded_after_the_preload(protein_process, "GATE_REPORT_MODULES", step, ("matplotlib",)) == []


def test_a_process_that_ends_while_a_module_loads_waits_for_the_load(tmp_path: Path, protein_process: Any) -> None:
    """The load finishes before the interpreter shuts down (atexit), so the process exits with its
    own status: the module here writes a file after a second; the process's main thread is done
    at once."""
    write_module(tmp_path, "preload_probe_slow", f"""
        import time
        from pathlib import Path
        time.sleep(1.0)
        Path({str(tmp_path / "loaded")!r}).write_text("done")
    """)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from protein.preload import preload; "
            "preload(['preload_probe_slow']); sys.exit(5)")
    result = protein_process.python(code, str(tmp_path))
    assert result.returncode == 5, result.stderr
    assert (tmp_path / "loaded").read_text() == "done"
