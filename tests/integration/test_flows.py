"""The flows under a real (temporary) Prefect API: states, branching on the gate, artifacts."""

from __future__ import annotations

import json

import pytest

from flows.params import GateParams, TrainParams, ValidationParams
from protein.registry import Registry
from protein.storage import open_store
from tests.helpers import module_scratch, write_dataset

pytestmark = pytest.mark.integration

TRAIN = TrainParams(epochs=1, image_size=32, batch_size=8)
VALIDATION = ValidationParams(image_size=40)
LENIENT = GateParams(min_score=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    return str(write_dataset(tmp_path_factory.mktemp("flows") / "ds", labels, ["900", "901", "902"], size=40))


@pytest.fixture(scope="module")
def promoted_store(prefect_harness, dataset, tmp_path_factory):
    """A store whose champion came from one passing retrain run."""
    from flows.retrain import retrain

    with module_scratch(tmp_path_factory, "store") as root:
        store = str(root / "store")
        state = retrain(data=dataset, store=store, train=TRAIN, gate_config=LENIENT, validation=VALIDATION,
                        return_state=True)
        assert state.is_completed(), state.message
        yield store, {**state.result(), "flow_run_id": state.state_details.flow_run_id}


def read_artifact(key, flow_run_id):
    """The artifact `key` of that flow run (its tasks' artifacts carry the run's id), never another
    test's run of the same session."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return sorted(found, key=lambda a: a.created)[-1] if found else None


def test_failing_validation_fails_the_run_and_trains_nothing(prefect_harness, tmp_path):
    from flows.retrain import retrain

    broken = write_dataset(tmp_path / "broken", {"1": "0", "2": "11"}, ["9"], size=40)
    store = tmp_path / "store"
    state = retrain(data=str(broken), store=str(store), train=TRAIN, gate_config=LENIENT, validation=VALIDATION,
                    return_state=True)
    assert state.is_failed()
    assert "failed validation" in state.message
    assert not (store / "models").exists() and not (store / "runs").exists()
    summary = read_artifact("validation-summary", state.state_details.flow_run_id)
    assert summary is not None and "FAILED" in summary.data


def test_a_lost_after_bound_the_server_cannot_support_fails_the_run_before_validation(prefect_harness, tmp_path):
    from flows.params import DispatchParams
    from flows.retrain import retrain

    # The harness server persists events every 5 s (Prefect's default): 10 s would crash live runs.
    broken = write_dataset(tmp_path / "broken", {"1": "0", "2": "11"}, ["9"], size=40)
    state = retrain(data=str(broken), store=str(tmp_path / "store"), train=TRAIN, validation=VALIDATION,
                    train_deployment="train/gpu", dispatch=DispatchParams(lost_after_seconds=10), return_state=True)
    assert state.is_failed()
    assert state.message == ("dispatch.lost_after_seconds is 10, below 20, the shortest safe bound for a Prefect "
                             "server that persists events every 5 s (its PREFECT_SERVER_SERVICES_EVENT_PERSISTER_"
                             "FLUSH_INTERVAL): live runs would be taken for dead; use 20 or more; nothing was "
                             "validated or trained"), state.message
    assert read_artifact("validation-summary", state.state_details.flow_run_id) is None


def test_passing_run_promotes_and_publishes(promoted_store):
    store, result = promoted_store
    registry = Registry(open_store(store))
    assert result["promoted"] is True
    assert registry.champion().champion == result["challenger"] == result["champion"]
    latest = json.loads(registry.store.get_bytes("submissions/latest.json"))
    assert latest["model_id"] == result["champion"]
    gate_record = json.loads(registry.store.get_bytes(f"gates/{result['challenger']}.json"))
    assert gate_record["decision"]["promote"] is True
    assert registry.store.exists(f"reports/{result['challenger']}/training.png")
    for key in ("training-progress", "gate-decision", "per-class-comparison", "training-plot", "submission",
                "champion-model", "validation-summary"):
        assert read_artifact(key, result["flow_run_id"]) is not None, key
    assert "PROMOTE" in read_artifact("gate-decision", result["flow_run_id"]).data


def test_challenger_that_does_not_beat_the_champion_is_not_promoted(promoted_store, dataset):
    from flows.retrain import retrain

    store, first = promoted_store
    strict = GateParams(min_score=0.0, min_gain=0.5, min_rows=1)  # min_rows: the tiny holdout is the evidence
    state = retrain(data=dataset, store=store, train=TRAIN, gate_config=strict,
                    validation=VALIDATION, return_state=True)
    assert state.is_completed(), state.message  # a rejected challenger is a normal outcome
    result = state.result()
    assert result["promoted"] is False and result["challenger"] != first["champion"]
    assert any("below the required" in reason for reason in result["reasons"])
    registry = Registry(open_store(store))
    assert registry.champion().champion == first["champion"]
    assert len(registry.champion().history) == 1
    assert result["challenger"] in registry.versions()  # kept for inspection, just not serving
    assert "KEEP CHAMPION" in read_artifact("gate-decision", state.state_details.flow_run_id).data


def test_a_first_challenger_the_gate_refuses_leaves_no_champion_and_no_submission(prefect_harness, dataset,
                                                                                 tmp_path):
    from flows.retrain import retrain

    store = tmp_path / "store"
    unreachable = GateParams(min_score=1.0, min_rows=1)  # no 1-epoch model scores a perfect F1
    state = retrain(data=dataset, store=str(store), train=TRAIN, gate_config=unreachable, validation=VALIDATION,
                    return_state=True)
    assert state.is_completed(), state.message  # the gate said no: a normal outcome, not a crash
    result = state.result()
    assert result["promoted"] is False and result["champion"] is None and result["submission"] is None
    assert any("below the minimum" in reason for reason in result["reasons"]), result["reasons"]
    registry = Registry(open_store(str(store)))
    assert registry.champion().champion is None
    assert result["challenger"] in registry.versions()
    assert not (store / "submissions").exists()


def test_predict_flow_writes_a_submission(promoted_store, dataset):
    from flows.predict import predict

    store, first = promoted_store
    result = predict(data=dataset, store=store)
    body = open_store(store).get_bytes(result["key"]).decode().splitlines()
    assert body[0] == "Image,Label" and [row.split(",")[0] for row in body[1:]] == ["900", "901", "902"]
    assert result["model_id"] == first["champion"]


def test_validate_flow_passes_good_data_and_keeps_its_report_in_the_workers_store(prefect_harness, dataset,
                                                                                  tmp_path, monkeypatch):
    from flows.validate import validate

    # No store given: the worker's PROTEIN_STORE, for the report and the drift reference alike.
    monkeypatch.setenv("PROTEIN_STORE", str(tmp_path / "store"))
    report = validate(data=dataset, validation=VALIDATION)
    assert report["success"] is True
    assert (tmp_path / "store" / "validation" / report["data_fingerprint"] / "report.json").is_file()


def test_a_validation_in_a_flow_leaves_no_folder_on_the_host(prefect_harness, dataset, tmp_path, monkeypatch):
    import tempfile

    from flows.validate import validate

    host_tmp = tmp_path / "host-tmp"
    host_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(host_tmp))
    assert validate(data=dataset, store=str(tmp_path / "store"), validation=VALIDATION)["success"] is True
    assert (tmp_path / "store" / "validation").is_dir()  # the report and Data Docs went to the store
    assert [p.name for p in host_tmp.iterdir() if p.name.startswith(("protein-", ".gx-"))] == []


def test_validation_worker_pool_leaves_no_traceback_in_the_logs(prefect_harness, tmp_path):
    """Validation decodes in a process pool once a dataset has enough images. A pool forked from a
    process running Prefect inherits its SIGTERM handler, which fired when the pool shut its
    workers down and wrote TerminationSignal tracebacks into every retrain's log."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    from protein.validation.images import POOL_MIN_IMAGES_DECODE
    from tests.helpers import REAL, REPO

    # Real label rows, so the distribution check has nothing to say about this data.
    rows = (REAL / "train.csv").read_text().splitlines()[1:POOL_MIN_IMAGES_DECODE + 21]
    labels = dict(row.split(",", 1) for row in rows)
    data = write_dataset(tmp_path / "many", labels, ["t1", "t2"], size=8)
    store = tmp_path / "store"
    # As a user runs it, so the run's log lines (the pool workers' included) reach a console we read.
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "flows.validate", "--data", str(data), "--store", str(store),
                             "--image-size", "8"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(store.glob("validation/*/report.json")).read_text())
    assert report["statistics"]["image_workers"] >= 2, "the pool under test did not run"
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "TerminationSignal" not in output, output[-3000:]
