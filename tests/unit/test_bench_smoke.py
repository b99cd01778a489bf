"""The GPU benchmark's CPU smoke run: the same code path at toy sizes, so the script cannot rot
on machines without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

LOADERS = ("model-only", "naive", "fit")
SMOKE_TIMEOUT_S = 120  # the run takes ~10-15 s on 2 cores; the margin absorbs a busy machine


def test_gpu_bench_cpu_quick_writes_positive_throughputs(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    # One intra-op thread: on a busy 2-core machine two OpenMP threads that wait on each other
    # made this run 4-5x slower (39 s vs 7 s measured); the smoke run checks code, not speed.
    env = {**os.environ, "BENCH_DATA_DIR": str(tmp_path / "bench-data"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--device", "cpu", "--quick", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("device", "device_name", "precision", "plan", "cache_build_s", "results", "errors", "machine"):
        assert key in result, key
    assert result["device"] == "cpu"
    assert result["errors"] == []
    rows = result["results"]
    assert {(r["arch"], r["loader"]) for r in rows} >= {("resnet34", loader) for loader in LOADERS}
    for row in rows:
        assert row["images_per_s"] > 0, row
        assert row["ratio_to_ceiling"] > 0, row
    assert all(r["ratio_to_ceiling"] == 1.0 for r in rows if r["loader"] == "model-only")
    assert result["plan"]["repeats"] >= 3  # every figure is a median
    for row in rows:
        assert row["inference_images_per_s"] > 0 and row["peak_gpu_memory_mib"] is None, row  # no GPU memory on CPU
    # One CPU, no GPUs: the DDP variant says why it did not run instead of vanishing.
    assert result["ddp"] == [] and any(s.startswith("DDP variant: needs at least 2 GPUs") for s in result["skipped"])
    assert result["device_name"]
    assert all(seconds >= 0 for seconds in result["cache_build_s"].values())
