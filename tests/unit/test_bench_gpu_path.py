"""bench/gpu.py times what users run: it calls the very functions `fit` calls to set up and run
training (spied on in protein.modeling.train), with the recipe's own config, not copies of them."""

from __future__ import annotations

import json
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
    config = recipe_config("winner", image_size=32, batch_size=8, epochs=1, weights="none", device="cpu", tta=False)
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
    # The written result says what code it measured: the checkout's commit, -dirty if edited.
    from bench.common import REPO, git_head

    assert json.loads((tmp_path / "gpu.json").read_text())["commit"] == git_head(REPO)


def test_the_gpu_bench_records_no_commit_where_the_tree_has_no_git_history(monkeypatch: pytest.MonkeyPatch,
                                                                           tmp_path: Path) -> None:
    from bench import gpu

    monkeypatch.setattr(gpu, "REPO", tmp_path)  # a copy of the tree without .git, as on a lent machine
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    assert gpu.commit() is None


def test_the_gpu_bench_ends_the_prefetch_thread_when_a_step_fails(monkeypatch: pytest.MonkeyPatch,
                                                                   single_torch_thread: None) -> None:
    """As fit does, the bench closes each epoch's batches: an out of memory error in a recipe (the
    bench records it and goes on to the next) leaves no prefetch thread holding pinned batches."""
    import threading

    import torch

    from bench import gpu
    from protein.modeling.batches import PREFETCH_THREAD_NAME, prefetch

    cpu_batches = train.epoch_batches

    def batches_as_on_cuda(*args: Any, **kwargs: Any) -> Any:  # prefetch is used on CUDA only
        batches, generators = cpu_batches(*args, **kwargs)
        return prefetch(batches), generators

    before = set(threading.enumerate())
    producers: list[threading.Thread] = []

    def out_of_memory_in_the_first_step(self: Any, config: Any, batches: Any, device: Any, generators: Any,
                                        on_batch: Any = None) -> Any:
        next(batches)
        producers.extend(t for t in threading.enumerate() if t.name == PREFETCH_THREAD_NAME and t not in before)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "epoch_batches", batches_as_on_cuda)
    monkeypatch.setattr(train.Training, "train_epoch", out_of_memory_in_the_first_step)
    plan = gpu.Plan(("default",), {"default": (32, 4)}, n_images=64, ceiling_steps=1, infer_images=4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)  # 16 batches: more than the queue holds
    targets = (rng.random((64, NUM_CLASSES)) < 0.3).astype(np.float32)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        gpu.measure_recipe("default", plan, torch.device("cpu"), images, targets)
    assert len(producers) == 1
    for thread in producers:
        thread.join(5.0)
    assert [t for t in producers if t.is_alive()] == []
    assert "simulated" in str(raised.value)  # the error, and the bench's frames with it, still held here
