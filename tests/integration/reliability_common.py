"""What the reliability tests share (tests/integration/test_*: resume after a kill, storage faults,
racing retrains, atomic writes, hostile input, secret leaks; docs/reliability.md tabulates them):
tiny datasets' labels, a gate that passes every challenger, one torch thread, and the `protein`
entry point run in this process."""

from __future__ import annotations

import io
import json
import random
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest

from flows.params import GateParams, ValidationParams

IMAGE = 32
# Every challenger passes the gate (min_rows=1: these datasets have a handful of holdout rows).
LENIENT = GateParams(min_score=0.0, min_gain=-1.0, max_class_drop=1.0, min_rows=1)
VALIDATION = ValidationParams(image_size=IMAGE)


def labels(n: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    return {str(i): " ".join(map(str, sorted(rng.sample(range(10), rng.randint(1, 2))))) for i in range(n)}


# One intra-op thread: on a shared 2-core machine OpenMP threads spinning against other load make an
# epoch anywhere from 2 s to 45 s; one thread is steady, and every run here uses the same count.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert result.returncode == code, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if " error: " in line]) == 1, result.stderr[-2000:]


def without_retry_waits(monkeypatch: pytest.MonkeyPatch, flow_module: types.ModuleType) -> None:
    """Every task ``flow_module`` calls keeps its retries, minus the waits between them (up to
    2 + 10 + 30 s a task, 10 + 60 s for training): a test of a failure would wait them out."""
    from prefect import Task

    for name, value in vars(flow_module).items():
        if isinstance(value, Task) and value.retries:
            monkeypatch.setattr(flow_module, name, value.with_options(retry_delay_seconds=0))


def champion_weights(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from protein.modeling.model import build_model

    path = tmp_path / "champion.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("resnet18").state_dict().items()}, str(path))
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The `protein` entry point in this process (no interpreter start-up): same exit codes and
    stderr lines; an exception escaping main() (a traceback for a user) fails the test."""
    import contextlib
    import warnings

    from protein.cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        code = main(list(args))
    noise = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue() + "".join(noise))


