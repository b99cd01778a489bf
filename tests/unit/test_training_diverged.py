"""A training whose loss stops being a number ends at that epoch with one line naming the learning
rate, registers nothing and keeps no NaN checkpoint; learning rates and seeds that cannot train are
refused before anything runs."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protein.config import TrainConfig
from protein.errors import TrainingDiverged
from protein.modeling import train as train_module
from tests.helpers import TINY_ARCH, write_dataset


@pytest.mark.parametrize(("field", "value"), [("lr", 0.0), ("lr", math.nan), ("lr", math.inf), ("lr", -1e-3),
                                              ("weight_decay", -1.0), ("weight_decay", math.nan),
                                              ("focal_gamma", math.nan), ("seed", -1), ("seed", 2**40)])
def test_a_setting_that_cannot_train_is_refused_naming_it(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field} must be"):
        TrainConfig(**{field: value})


def train_breaking_epoch_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                           breaks: Callable[[Any, dict[str, float]], dict[str, float]], run_id: str,
                           epochs: int) -> tuple[int, str, list[int], dict[str, Any] | None]:
    """`protein train` on a tiny dataset whose second epoch ends as ``breaks`` (the training, its
    stats) makes it; (exit code, stderr, epochs run, the checkpoint left)."""
    from protein.cli import main
    from protein.modeling.checkpoints import load_checkpoint
    from protein.storage import open_store

    real = train_module.Training.train_epoch
    epochs_run: list[int] = []

    def epoch(self, config, batches, device, generators, on_batch=None):  # noqa: ANN001, ANN202
        stats = real(self, config, batches, device, generators, on_batch)
        epochs_run.append(len(epochs_run) + 1)
        return breaks(self, stats) if len(epochs_run) == 2 else stats

    monkeypatch.setattr(train_module.Training, "train_epoch", epoch)
    data = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(20)}, ["900"], size=16)
    store = tmp_path / "store"
    code = main(["train", "--data", str(data), "--store", str(store), "--arch", TINY_ARCH, "--device", "cpu",
                 "--image-size", "16", "--epochs", str(epochs), "--batch-size", "4", "--run-id", run_id])
    assert not (store / "models").exists(), "registered a diverged model"
    return code, capsys.readouterr().err, epochs_run, load_checkpoint(open_store(str(store)), run_id)


def test_a_loss_that_is_no_longer_a_number_stops_the_run_registering_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, err, epochs_run, checkpoint = train_breaking_epoch_2(
        tmp_path, monkeypatch, capsys, lambda run, stats: {**stats, "train_loss": math.nan}, "r-nan", epochs=3)
    assert code == TrainingDiverged.exit_code == 12, err
    line = [line for line in err.splitlines() if "error:" in line]
    assert len(line) == 1 and "Traceback" not in err
    assert "training run r-nan diverged at epoch 2: the training loss is nan" in line[0] and "lr 0.002" in line[0]
    assert epochs_run == [1, 2]
    assert checkpoint is not None and checkpoint["epoch"] == 1  # the last finite epoch, never the NaN one


def test_weights_the_last_step_left_not_finite_stop_the_run_before_their_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The epoch's loss is each step's before its update: an epoch whose last step broke the weights
    reported a finite loss, and its NaN weights were checkpointed (and registered on the last epoch)."""
    import torch

    def nan_weights(run: Any, stats: dict[str, float]) -> dict[str, float]:
        with torch.no_grad():
            next(run.model.parameters()).fill_(math.nan)
        return stats

    code, err, epochs_run, checkpoint = train_breaking_epoch_2(
        tmp_path, monkeypatch, capsys, nan_weights, "r-nan-weights", epochs=2)
    assert code == TrainingDiverged.exit_code, err
    assert "training run r-nan-weights diverged at epoch 2: its weights after the epoch's last step are not " \
           "finite numbers" in err and "Traceback" not in err
    assert epochs_run == [1, 2]
    assert checkpoint is not None and checkpoint["epoch"] == 1


def test_focal_loss_gradients_stay_finite_at_confident_logits_for_every_gamma() -> None:
    import torch

    from protein.modeling.optimization import FocalLoss

    for gamma in (0.0, 0.5, 1.0, 2.0):
        logits = torch.tensor([[20.0, -20.0, 0.3]], requires_grad=True)
        loss = FocalLoss(gamma)(logits, torch.tensor([[1.0, 0.0, 1.0]]))
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (gamma, logits.grad)
