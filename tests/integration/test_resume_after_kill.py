"""Training killed (SIGKILL mid-epoch, a Prefect retry of the train task) resumes from its last
checkpoint and ends where an uninterrupted run ends. docs/reliability.md, "Training interrupted"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flows.params import TrainParams
from protein.modeling.checkpoints import load_checkpoint, metrics_key
from protein.registry import Registry
from protein.storage import open_store
from tests.helpers import write_dataset
from tests.integration.reliability_common import (
    IMAGE,
    LENIENT,
    ONE_THREAD,
    VALIDATION,
    labels,
    last_json,
    without_retry_waits,
)

pytestmark = pytest.mark.integration

# The real CLI, instrumented only to report progress: one line per training batch, so the test can
# SIGKILL the process in the middle of an epoch however fast or slow this machine is today.
PROGRESS_RUNNER = """
import os, sys
import protein.modeling.train as train
from protein.cli import main

progress = open(os.environ["PROTEIN_TEST_PROGRESS"], "a", buffering=1)
iterate = train.iterate_batches

def counted(*args, **kwargs):
    for batch in iterate(*args, **kwargs):
        progress.write("batch\\n")
        yield batch

train.iterate_batches = counted
sys.exit(main(sys.argv[1:]))
"""


def read_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def resume_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 120 images, 96 in training, batch 4: 24 steps per epoch, so a kill can land inside one.
    return write_dataset(tmp_path_factory.mktemp("resume") / "ds", labels(120, seed=1), ["900"], size=IMAGE)


def test_sigkill_mid_epoch_then_rerun_resumes_and_matches_an_uninterrupted_run(resume_dataset, tmp_path,
                                                                              protein_process):
    from safetensors.torch import load_file

    epochs, batch = 3, 4
    cache = tmp_path / "cache"
    args = ["train", "--data", str(resume_dataset), "--cache-dir", str(cache), "--epochs", str(epochs),
            "--image-size", str(IMAGE), "--batch-size", str(batch), "--device", "cpu", "--seed", "7"]

    reference = protein_process.run(*args, "--store", str(tmp_path / "reference"), "--run-id", "reference",
                                    env=ONE_THREAD)
    assert reference.returncode == 0, reference.stderr
    reference_result = last_json(reference.stdout)
    assert reference_result["resumed_from_epoch"] == 0

    store = open_store(str(tmp_path / "store"))
    progress = tmp_path / "progress"
    spec = json.loads(open_store(str(tmp_path / "reference")).get_bytes(
        f"models/{reference_result['model_id']}/model.json"))
    # Training drops a ragged last batch (a batch of one image breaks BatchNorm).
    n_train = spec["holdout"]["n_train"]
    steps = n_train // batch if n_train >= batch else 1
    command = [sys.executable, "-c", PROGRESS_RUNNER, *args, "--store", store.uri, "--run-id", "killed"]
    env = {**os.environ, **ONE_THREAD, "PROTEIN_TEST_PROGRESS": str(progress)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    epoch_one_at = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if epoch_one_at is None and store.exists(metrics_key("killed")):
                epoch_one_at = time.monotonic()  # epoch 1 checkpointed and recorded
            if epoch_one_at is not None and read_lines(progress) >= steps + steps // 2:
                break  # half of epoch 2's batches are done
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert epoch_one_at is not None, "epoch 1 was never recorded"
    # The kill landed inside epoch 2: one epoch checkpointed, epoch 2 partly trained.
    assert steps < read_lines(progress) < 2 * steps
    assert load_checkpoint(store, "killed")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in store.get_bytes(metrics_key("killed")).splitlines()] == [1]
    lost_s = killed_at - epoch_one_at

    progress.unlink()
    started = time.monotonic()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    rerun_s = time.monotonic() - started
    assert rerun.returncode == 0, rerun.stderr
    result = last_json(rerun.stdout)
    assert result["resumed_from_epoch"] == 1
    assert read_lines(progress) == (epochs - 1) * steps  # epoch 1 was not trained again
    resumed_spec = json.loads(store.get_bytes(f"models/{result['model_id']}/model.json"))
    assert [h["epoch"] for h in resumed_spec["history"]] == [1, 2, 3]

    # Same seed on CPU: the resumed run reproduces the uninterrupted one.
    ours = load_file(str(store.root / "models" / result["model_id"] / "model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "models" / reference_result["model_id"] / "model.safetensors"))
    import torch

    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours if ours[k].numel())
    assert worst <= 1e-5, f"weights differ by up to {worst}"
    assert all(torch.allclose(ours[k].double(), theirs[k].double(), rtol=0, atol=1e-5) for k in ours)
    assert result["metrics"] == pytest.approx(reference_result["metrics"], abs=1e-6)
    for mine, ref in zip(resumed_spec["history"], spec["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert mine["holdout_loss"] == pytest.approx(ref["holdout_loss"], rel=1e-5)
    epoch_s = max(h["train_seconds"] for h in resumed_spec["history"][1:])
    print(f"\nresume: killed {lost_s:.2f}s into epoch 2 (epoch ~{epoch_s:.2f}s), rerun {rerun_s:.1f}s, "
          f"max weight difference {worst:.3g}")


def test_prefect_retry_of_the_train_task_resumes_after_the_last_checkpoint(
    prefect_harness, small_dataset, tmp_path, isolated_cache, single_torch_thread, monkeypatch
):
    import flows.retrain as retrain_module
    import protein.pipeline as pipeline

    attempts: list[dict[str, Any]] = []
    real = pipeline.train_and_register

    def crashes_once_after_epoch_one(*args: Any, on_epoch: Callable | None = None, **kwargs: Any) -> dict[str, Any]:
        attempt = {"number": len(attempts) + 1, "epochs_seen": []}
        attempts.append(attempt)

        def hook(record: dict[str, Any]) -> None:
            if on_epoch:
                on_epoch(record)
            attempt["epochs_seen"].append(record["epoch"])
            if attempt["number"] == 1 and record["epoch"] == 1:
                raise RuntimeError("simulated worker crash after epoch 1")

        attempt["result"] = real(*args, on_epoch=hook, **kwargs)
        return attempt["result"]

    monkeypatch.setattr(pipeline, "train_and_register", crashes_once_after_epoch_one)  # what train_model calls
    without_retry_waits(monkeypatch, retrain_module)  # same task, same retries, no 10 s wait

    store = str(tmp_path / "store")
    state = retrain_module.retrain(data=str(small_dataset), store=store, train=TrainParams(
        epochs=2, image_size=IMAGE, batch_size=8), gate_config=LENIENT, validation=VALIDATION, return_state=True)
    assert state.is_completed(), state.message
    assert [a["epochs_seen"] for a in attempts] == [[1], [2]]  # the retry trained epoch 2 only
    assert "result" not in attempts[0] and attempts[1]["result"]["resumed_from_epoch"] == 1
    result = state.result()
    registry = Registry(open_store(store))
    assert registry.champion().champion == result["challenger"] == attempts[1]["result"]["model_id"]
    assert [h["epoch"] for h in registry.spec(result["challenger"])["history"]] == [1, 2]
    assert registry.versions() == [result["challenger"]]  # the failed attempt registered nothing
    # The registration names the flow run that made it (it named user@host), as a promotion does.
    registered_by = registry.spec(result["challenger"])["event"]["actor"]
    assert registered_by == f"prefect-flow-run:{state.state_details.flow_run_id}", registered_by
