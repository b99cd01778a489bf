"""A retrain refused on its input ends its command line with the protein CLI's exit code for that
input (docs/first-run.md), not 1, the code of "data failed validation"."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from flows import retrain as retrain_module
from flows.params import TrainParams, report_state
from protein.errors import EvidenceRefused, FingerprintMismatch, PromotionConflict, RecordError, StoreError


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


class Promoted:
    """retrain's tasks faked up to a gate that passed challenger v2 over champion v1: what the flow
    body does after them runs as written."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.summaries: list[dict[str, Any]] = []
        fakes: dict[str, Any] = {
            "get_run_logger": lambda: logging.getLogger("retrain"),
            "definition_gate_of_this_run": lambda: None,
            "resolve_dataset": lambda data, *args: {"uri": data, "channel": None, "trigger_sequence": None,
                                                    "sequence": None, "fingerprint": None},
            "current_champion": lambda store: "v1",
            "validate_data": lambda *args: {"data_fingerprint": "f" * 64, "report_uri": "file:///r.html",
                                            "success": True, "failures": []},
            "flow_training_run_id": lambda *args: "ffffffff-run",
            "train_model": lambda *args, **kwargs: {"model_id": "v2"},
            "earlier_gate_decision": lambda store, challenger: None,
            "gate_evaluation": lambda *args: {"challenger": {}, "champion": {}},
            "champion_data_fingerprint": lambda store, champion: "e" * 64,
            "data_push_order": lambda *args: {"channel": "", "challenger_sequence": None, "champion_sequence": None},
            "gate": lambda *args: {"promote": True, "reasons": ["v2 beats v1"], "record_uri": "file:///g.json",
                                   "challenger_score": 0.6, "champion_score": 0.5},
            "promote_model": lambda store, challenger, *args, **kwargs: {"champion": challenger},
            "publish_run_summary": self.summaries.append,
        }
        for name, fake in fakes.items():
            monkeypatch.setattr(retrain_module, name, fake)


@pytest.mark.parametrize(("error", "exit_code"), [
    (StoreError("s3://bucket/models/v2/model.safetensors: unreachable after 5 tries"), 3),
    (RecordError("s3://bucket/models/v2/model.json: not JSON"), 8),
    (FingerprintMismatch("the data changed since it was validated"), 2),
    (EvidenceRefused("the score host's probabilities do not check out"), 3),
    (RuntimeError("score-predict on the gpu pool failed"), 1),
    (KeyError("rows"), 1),
])
def test_a_submission_that_fails_after_a_promotion_says_the_champion_and_keeps_the_summary(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        error: Exception, exit_code: int) -> None:
    """A StoreError (S3 down past its retries) escaped the flow: no retrain-summary, and the alert's
    body was the S3 error alone, never the champion the gate's promotion left serving."""
    promoted = Promoted(monkeypatch)

    def submission_fails(*args: Any) -> str:
        raise error

    monkeypatch.setattr(retrain_module, "submission_uri", submission_fails)
    state = retrain_module.retrain.fn(str(tmp_path / "data"), str(tmp_path / "store"))
    assert state.is_failed() and state.message.endswith("(the gate's decision stands: champion is v2)"), state.message
    assert report_state(state, "python -m flows.retrain") == exit_code
    assert capsys.readouterr().err.count("\n") == 1
    [summary] = promoted.summaries
    assert (summary["outcome"], summary["champion_after"], summary["message"]) == (
        "promoted; no submission", "v2", state.message)


def test_a_promotion_that_lost_its_compare_and_swap_exits_5(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """docs/cli.md: 5 is a promotion conflict; the flow's bare Failed ended the command line in 1."""
    promoted = Promoted(monkeypatch)
    withdrawn: list[str] = []

    def another_promotion_won(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise PromotionConflict("the champion is v3, not v1")

    monkeypatch.setattr(retrain_module, "promote_model", another_promotion_won)
    monkeypatch.setattr(retrain_module, "withdraw_gate_pass",
                        lambda store, challenger, why: withdrawn.append(challenger))
    monkeypatch.setattr(retrain_module, "submission_uri", lambda *args: pytest.fail("submitted after a lost promotion"))
    state = retrain_module.retrain.fn(str(tmp_path / "data"), str(tmp_path / "store"))
    assert report_state(state, "python -m flows.retrain") == 5
    err = capsys.readouterr().err
    assert err.startswith("python -m flows.retrain failed: PromotionConflict: the champion is v3, not v1; the gate "
                          "passed v2, which does not serve") and err.count("\n") == 1, err
    assert withdrawn == ["v2"] and promoted.summaries[-1]["outcome"] == "gate passed, promotion lost"


def test_sigterm_outside_a_flow_run_stops_the_local_server_and_exits_143(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """SIGTERM while the command waits for its server or between flows; the real server, and a run
    in progress, are tests/integration/test_first_run.py's."""
    import contextlib
    import os
    import signal
    from collections.abc import Iterator

    import flows.cli

    stopped: list[str] = []
    unhandled: list[int] = []

    @contextlib.contextmanager
    def local_server(announce: object = None, local_only: bool = False) -> Iterator[str]:
        try:
            yield "http://127.0.0.1:1/api"
        finally:
            stopped.append("server")

    def killed() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    monkeypatch.setattr(flows.cli, "prefect_api", local_server)
    # Without a handler of the command's own, this one records the signal instead of ending pytest.
    def recording(signum: int, frame: object) -> None:
        unhandled.append(signum)

    previous = signal.signal(signal.SIGTERM, recording)
    try:
        code = flows.cli.run_with_prefect("python -m flows.retrain", killed)
        assert signal.getsignal(signal.SIGTERM) is recording, "the handler in place before was not put back"
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (code, stopped, unhandled) == (flows.cli.EXIT_TERMINATED, ["server"], [])
    assert capsys.readouterr().err == "python -m flows.retrain: terminated (SIGTERM)\n"
