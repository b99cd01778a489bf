"""Dataset channels through the retrain flow under a real (temporary) Prefect API: a push moves
the channel, a run resolves it once, skips what the champion has, coalesces superseded pushes,
and never promotes older data without a person's flag."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.params import GateParams, TrainParams, ValidationParams
from protein.cli import main as protein_main
from protein.data.channels import read_channel
from protein.registry import Registry
from protein.storage import LocalStore, open_store
from tests.helpers import TINY_ARCH, module_scratch, write_dataset

pytestmark = pytest.mark.integration

TRAIN = TrainParams(arch=TINY_ARCH, epochs=1, image_size=32, batch_size=8)
VALIDATION = ValidationParams(image_size=40)
# Any challenger that clears 0 passes, so only the data-order rule can refuse it.
LENIENT = GateParams(min_score=0.0, min_gain=-1.0, max_class_drop=1.0, min_rows=1)
PATTERN = ["0", "4", "6 4", "2 5"]


def push(data: Path, store: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert protein_main(["datasets", "push", "--data", str(data), "--store", store]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def run_artifact(key: str, flow_run_id: Any) -> Any:
    """The artifact `key` of that flow run, never another run's of the same session."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [found] = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return found


@pytest.fixture(scope="module")
def pushes(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """Two datasets with disjoint image ids (so a gate between them has rows neither trained on)."""
    with module_scratch(tmp_path_factory, "channels") as root:
        tests = ["900", "901"]
        older = write_dataset(root / "older", {str(i): PATTERN[i % 4] for i in range(24)}, tests, size=40)
        newer = write_dataset(root / "newer", {str(100 + i): PATTERN[i % 4] for i in range(24)}, tests, size=40)
        yield str(root / "store"), older, newer


def test_the_channel_is_resolved_once_trained_skipped_when_unchanged_and_never_goes_backwards(
    pushes: tuple[str, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.retrain import retrain

    store, older, newer = pushes
    first, second = push(older, store, capsys), push(newer, store, capsys)
    assert (first["sequence"], second["sequence"], second["channel"]) == (1, 2, "latest")
    history = read_channel(LocalStore(Path(store)), "latest").history
    assert [(e.sequence, e.fingerprint, e.event_id) for e in history] == [
        (1, first["fingerprint"], first["event_id"]), (2, second["fingerprint"], second["event_id"])]
    assert protein_main(["datasets", "list", "--store", store, "--channel", "latest", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [row["sequence"] for row in listed] == [2, 1], "newest first"

    state = retrain(data="channel:latest", store=store, train=TRAIN, gate_config=LENIENT, validation=VALIDATION,
                    return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["promoted"] and result["data_fingerprint"] == second["fingerprint"]
    registry = Registry(open_store(store))
    spec = registry.spec(result["champion"])
    assert (spec["data_uri"], spec["data_fingerprint"]) == (second["uri"].rstrip("/"), second["fingerprint"])
    gate = json.loads(registry.store.get_bytes(f"gates/{result['challenger']}.json"))["decision"]
    assert gate["dataset"]["uri"] == second["uri"] and gate["dataset"]["sequence"] == 2
    assert gate["dataset"]["event_id"] == second["event_id"]
    summary = run_artifact("retrain-summary", state.state_details.flow_run_id).data
    assert f"- data: `{second['uri']}`" in summary
    assert f"- resolved from: channel `latest` push #2 (event `{second['event_id']}`)" in summary

    # The nightly's parameters on the channel: the champion has this data, nothing is trained.
    skipped = retrain(data="channel:latest", store=store, skip_if_unchanged=True, return_state=True)
    assert skipped.is_completed() and skipped.message.startswith("nothing trained: the data"), skipped.message

    # A manual run on the older push: its gate passes, but the champion's data never goes back.
    back = retrain(data=first["uri"], store=store, train=TRAIN, gate_config=LENIENT, validation=VALIDATION,
                   return_state=True)
    assert back.is_completed(), back.message
    refused = back.result()
    assert refused["promoted"] is False and registry.champion().champion == result["champion"]
    assert any("older than the champion's push #2" in r and "never goes backwards" in r
               for r in refused["reasons"]), refused["reasons"]
    record = json.loads(registry.store.get_bytes(f"gates/{refused['challenger']}.json"))["decision"]
    assert record["promote"] is False and record["data_order"]["backwards"] is True

    # A scheduled run on the data the gate just refused does not train it again (it once did,
    # every night): the gate's judgement of this data and this training config stands.
    versions = registry.versions()
    again = retrain(data=first["uri"], store=store, train=TRAIN, gate_config=LENIENT, validation=VALIDATION,
                    skip_if_unchanged=True, return_state=True)
    assert again.is_completed() and again.message.startswith(
        f"nothing trained: challenger {refused['challenger']} was trained on this data "
        f"(fingerprint {first['fingerprint'][:12]}) with this training config and the gate refused it"), again.message
    assert registry.versions() == versions

    # A person says so: promoted, and the champion's history records who allowed it.
    allowed = retrain(data=first["uri"], store=store, train=TRAIN, gate_config=LENIENT, validation=VALIDATION,
                      allow_older_data=True, return_state=True)
    assert allowed.is_completed(), allowed.message
    assert allowed.result()["promoted"] is True
    last = registry.champion().history[-1]
    assert last["model_id"] == allowed.result()["challenger"]
    assert "allowed by prefect-flow-run:" in last["reason"] and "(allow_older_data)" in last["reason"]


def test_a_push_superseded_before_its_run_starts_is_not_trained_twice(
    pushes: tuple[str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flows.retrain import retrain

    _, older, newer = pushes
    store = str(tmp_path / "store")
    first, second = push(older, store, capsys), push(newer, store, capsys)
    state = retrain(data="channel:latest", store=store, trigger_event=f"protein.dataset.pushed {first['event_id']}",
                    return_state=True)
    assert state.is_completed(), state.message
    assert state.message == (f"nothing trained: push #1 on channel 'latest' was superseded by push #2 "
                             f"({second['fingerprint'][:12]}), which its own run trains")
    assert not Registry(open_store(store)).versions()


def test_a_channel_with_no_push_fails_the_run_in_one_line(prefect_harness: None, tmp_path: Path) -> None:
    from flows.retrain import retrain

    state = retrain(data="channel:latest", store=str(tmp_path / "store"), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("data channel:latest: channel:latest: no dataset was pushed on channel 'latest'")


def submission_key(store: str, uri: str) -> str:
    """The store key of a submission the flow reported as a file:// URI."""
    return str(Path(uri.removeprefix("file://")).relative_to(Path(store).resolve()))


def test_a_retry_after_a_push_resumes_the_push_its_first_attempt_resolved(
    pushes: tuple[str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's retry (Retry in the UI, Prefect's retries) starts the flow again: it takes the push
    its first attempt resolved, under the same training run id, instead of training the newer push.
    The first attempt promoted its challenger, then its submission failed: the retry neither skips as
    "data unchanged" (that data and champion are its own work) nor gates the champion against itself
    (which would overwrite the record of its promotion with a refusal); it goes on to the submission."""
    import flows.retrain as retrain_module
    from tests.integration.test_flows import read_artifact

    submissions = retrain_module.submission_uri
    calls: list[int] = []

    def fails_the_first_time(*args: Any, **kwargs: Any) -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("score-predict on the gpu pool failed (simulated)")
        return submissions(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "submission_uri", fails_the_first_time)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.flow_engine import run_flow
    from prefect.states import State

    from flows.retrain import retrain

    _, older, newer = pushes
    store = str(tmp_path / "store")
    first = push(older, store, capsys)
    parameters = {"data": "channel:latest", "store": store, "train": TRAIN.model_dump(),
                  "gate_config": LENIENT.model_dump(), "validation": VALIDATION.model_dump(),
                  "skip_if_unchanged": True}
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(retrain, parameters=parameters)
        state = run_flow(retrain, flow_run=client.read_flow_run(run.id), parameters=parameters, return_type="state")
        assert state.is_failed() and "the gate's decision stands: champion is " in state.message, state.message
        champion = Registry(open_store(store)).champion().champion
        summary = read_artifact("retrain-summary", run.id)
        assert summary is not None and "# Retrain: promoted; no submission" in summary.data
        gate_record = open_store(store).get_bytes(f"gates/{champion}.json")
        push(newer, store, capsys)  # a push lands before the operator retries the run
        client.set_flow_run_state(run.id, State(type=StateType.SCHEDULED, name="AwaitingRetry"), force=True)
        state = run_flow(retrain, flow_run=client.read_flow_run(run.id), parameters=parameters, return_type="state")
        assert state.is_completed(), state.message
        attempt_2 = state.result()
    assert attempt_2["data_fingerprint"] == first["fingerprint"]
    assert attempt_2["challenger"] == champion and attempt_2["run_id"] == Registry(open_store(store)).spec(
        champion)["run_id"]  # the first attempt's training run, resumed (done: not trained again)
    assert len(Registry(open_store(store)).versions()) == 1  # the newer push is its own run's to train
    assert attempt_2["promoted"] and attempt_2["champion"] == champion
    assert any("promoted by an earlier attempt of this run" in reason for reason in attempt_2["reasons"])
    assert open_store(store).get_bytes(f"gates/{champion}.json") == gate_record  # not re-gated
    assert len(Registry(open_store(store)).champion().history) == 1
    assert open_store(store).exists(submission_key(store, attempt_2["submission"]))
