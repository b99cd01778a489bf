"""bench/gpu.py times what users run: it calls the very functions `fit` calls to set up and run
training (spied on in protein.modeling.train), with the recipe's own config, not copies of them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protein.config import recipe_config
from protein.labels import NUM_CLASSES
from protein.modeling import train
from protein.storage import open_store

FIT_PATH = ("build_training", "epoch_batches", "train_one_epoch", "train_step")


def spy_on_fit_path(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    calls: list[tuple[str, Any]] = []
    for name in FIT_PATH:
        original = getattr(train, name)

        def recorded(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            calls.append((_name, args[0] if _name in ("build_training", "epoch_batches") else None))
            return _original(*args, **kwargs)

        monkeypatch.setattr(train, name, recorded)
    return calls


def test_the_gpu_bench_runs_fits_own_functions_with_the_recipes_config(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path, single_torch_thread: None):
    calls = spy_on_fit_path(monkeypatch)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    targets = (rng.random((24, NUM_CLASSES)) < 0.3).astype(np.float32)
    config = recipe_config("winner", image_size=32, batch_size=8, epochs=1, weights="", device="cpu", tta=False)
    train.fit(config, images, targets, np.arange(16), np.arange(16, 24), open_store(str(tmp_path / "store")), "r")
    by_fit = {name for name, _ in calls}
    fit_config = next(arg for name, arg in calls if name == "build_training")

    calls.clear()
    monkeypatch.setenv("BENCH_DATA_DIR", str(tmp_path / "bench-data"))
    from bench import gpu

    result = gpu.main(["--device", "cpu", "--quick", "--recipes", "winner", "--out", str(tmp_path / "gpu.json")])
    by_bench = {name for name, _ in calls}
    assert by_fit == by_bench == set(FIT_PATH)
    bench_config = next(arg for name, arg in calls if name == "build_training")
    for field in ("arch", "recipe", "jitter", "ema_half_life_epochs", "loss", "channels_last", "lr_scaling"):
        assert getattr(bench_config, field) == getattr(fit_config, field), field
    assert result["errors"] == [] and {r["loader"] for r in result["results"]} == {"model-only", "fit"}
