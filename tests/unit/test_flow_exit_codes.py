"""A retrain refused on its input ends its command line with the protein CLI's exit code for that
input (docs/first-run.md), not 1, the code of "data failed validation"."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows import retrain as retrain_module
from flows.params import TrainParams, report_state


@pytest.fixture
def retrain_fn(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(retrain_module, "get_run_logger", lambda: logging.getLogger("retrain"))
    monkeypatch.setattr(retrain_module, "resolve_dataset",
                        lambda *args, **kwargs: pytest.fail("resolved data after a refusal"))
    return retrain_module.retrain.fn


def test_train_settings_that_cannot_split_the_batch_exit_2(retrain_fn, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    state = retrain_fn(str(tmp_path), str(tmp_path), train=TrainParams(batch_size=10, nproc=3))
    assert report_state(state, "python -m flows.retrain") == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m flows.retrain failed: train settings: ") and err.count("\n") == 1, err


def test_an_event_naming_no_dataset_exits_2(retrain_fn, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = retrain_fn("s3://", str(tmp_path), trigger_event="protein.dataset.pushed 1234")
    assert report_state(state, "python -m flows.retrain") == 2
    err = capsys.readouterr().err
    assert "event protein.dataset.pushed 1234: field payload.uri is " in err and err.count("\n") == 1, err


def test_a_standalone_train_whose_batch_cannot_split_exits_2_before_reading_data(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """It failed inside training, after the whole split was decoded, as a ValueError retried twice."""
    from flows import train as train_module

    monkeypatch.setattr(train_module, "train_model", lambda *args, **kwargs: pytest.fail("trained"))
    state = train_module.train.fn(str(tmp_path), "r1", str(tmp_path), train=TrainParams(batch_size=32, accumulate=32))
    assert report_state(state, "train") == 2
    err = capsys.readouterr().err
    assert err.startswith("train failed: train settings: ") and err.count("\n") == 1, err
