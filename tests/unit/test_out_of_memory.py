"""Training that runs out of memory stops with one line that says what to change, on one rank
or on several: a retry would run the same config (a resume refuses another) and run out again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from protein.config import TrainConfig
from protein.errors import OutOfMemory
from protein.modeling import distributed
from protein.pipeline import training
from tests.helpers import TINY_ARCH, write_dataset

TORCH_MESSAGE = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB\n"
                 "Of the allocated memory 75.2 GiB is allocated by PyTorch")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    labels = {str(i): str(i % 10) for i in range(20)}
    return write_dataset(tmp_path / "ds", labels, ["900"], size=16)


@pytest.fixture
def fit_runs_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def fit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError(TORCH_MESSAGE)

    monkeypatch.setattr(training, "fit", fit)


def test_the_cli_says_what_ran_out_and_what_to_change_in_one_line(
        tmp_path, dataset, fit_runs_out_of_memory, protein_cli):  # noqa: ANN001
    store = tmp_path / "store"
    result = protein_cli("train", "--data", str(dataset), "--store", str(store), "--arch", TINY_ARCH,
                         "--device", "cpu", "--batch-size", "8", "--accumulate", "2", "--run-id", "r-oom")
    assert result.returncode == OutOfMemory.exit_code == 11
    lines = result.stderr.strip().splitlines()
    error = [line for line in lines if "error:" in line]
    assert len(error) == 1 and "Traceback" not in result.stderr
    line = error[0]
    assert line.startswith("protein train: error: training run r-oom ran out of memory at batch size 8 ")
    assert "(--accumulate 2, 1 rank(s): 4 images a forward pass)" in line
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in line and "Of the allocated" not in line
    assert "--batch-size" in line and "--accumulate K" in line and "Not retried" in line
    assert not (store / "models").exists()  # nothing registered


def test_the_torch_error_stays_the_cause(dataset, tmp_path, fit_runs_out_of_memory) -> None:  # noqa: ANN001
    with pytest.raises(OutOfMemory, match="ran out of memory") as raised:
        training.train_and_register(dataset, str(tmp_path / "store"), TrainConfig(arch=TINY_ARCH, device="cpu"),
                                    run_id="r-oom")
    assert isinstance(raised.value.__cause__, torch.OutOfMemoryError)  # the traceback keeps where it ran out


def test_other_errors_of_training_pass_unchanged(dataset, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    def fit(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(training, "fit", fit)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        training.train_and_register(dataset, str(tmp_path / "store"), TrainConfig(arch=TINY_ARCH, device="cpu"),
                                    run_id="r-other")


def test_rank_zero_out_of_memory_reaches_the_launcher_with_its_advice(
        tmp_path, dataset, fit_runs_out_of_memory, monkeypatch, capsys) -> None:  # noqa: ANN001
    """Under torchrun, rank 0's OutOfMemory is handed to the launcher: exit 11 with the advice, not
    exit 7's "a rank died, rerun to resume", which would run out again."""
    from protein.cli import main

    result_file = tmp_path / "result.json"
    monkeypatch.setenv(distributed.RESULT_FILE_ENV, str(result_file))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"data": str(dataset), "store": str(tmp_path / "store"),
                               "config": {"device": "cpu", "arch": TINY_ARCH}, "run_id": "r-oom", "cache_dir": None}))
    assert main(["train-job", str(job)]) == 11
    written = json.loads(result_file.read_text())
    assert written["exit_code"] == 11 and "--accumulate K" in written["error"]
    capsys.readouterr()

    monkeypatch.setattr(training.distributed, "launch", lambda nproc, argv: (1, written))
    code = main(["train", "--data", str(dataset), "--store", str(tmp_path / "store"), "--nproc", "2",
                 "--batch-size", "8", "--device", "cpu", "--run-id", "r-oom", "--arch", TINY_ARCH])
    assert code == 11
    assert "ran out of memory" in capsys.readouterr().err
