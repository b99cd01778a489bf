"""The GPU benchmark's CPU smoke run: the same code path at toy sizes, so the script cannot rot
on machines without a GPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import ProteinProcess
from tests.helpers import REPO

PATHS = ("model-only", "fit")
SMOKE_TIMEOUT_S = 300  # two recipes (efficientnet_b1 with 8-view TTA): ~40-70 s on 2 busy cores


def test_gpu_bench_cpu_quick_writes_positive_throughputs(tmp_path: Path, protein_process: ProteinProcess) -> None:
    out = tmp_path / "gpu.json"
    # One intra-op thread: on a busy 2-core machine two OpenMP threads that wait on each other
    # made this run 4-5x slower (39 s vs 7 s measured); the smoke run checks code, not speed.
    env = {**os.environ, "BENCH_DATA_DIR": str(tmp_path / "bench-data"), "OMP_NUM_THREADS": "1"}
    proc = protein_process.module("bench.gpu", "--device", "cpu", "--quick", "--out", str(out), env=env, cwd=REPO,
                                  timeout=SMOKE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in ("device", "card", "precision", "plan", "cache_build_s", "results", "errors", "machine"):
        assert key in result, key
    assert result["device"] == "cpu" and result["card"]["name"].startswith("cpu")
    assert result["errors"] == []
    rows = result["results"]
    assert {(r["recipe"], r["loader"]) for r in rows} == {(r, p) for r in ("winner", "default") for p in PATHS}
    winner = next(r for r in rows if r["recipe"] == "winner")
    assert winner["arch"] == "efficientnet_b1" and winner["ema"] and winner["tta"] and winner["jitter"] > 0
    for row in rows:
        assert row["images_per_s"] > 0 and row["inference_images_per_s"] > 0, row
        assert len(row["window_seconds"]) == 3  # every figure: the median of 3 windows, with their spread
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"], row
        assert row["peak_gpu_memory_mib"] is None, row  # no GPU memory on CPU
    assert all(r["ratio_to_ceiling"] == 1.0 for r in rows if r["loader"] == "model-only")
