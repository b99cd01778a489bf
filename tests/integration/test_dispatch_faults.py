"""The dispatch task against the faults of a long-running loop, on the multi-host layout of
test_multihost (a real `prefect server start`, a CPU-host worker, GPU-host workers that clone the
deployed commit, S3 on moto): a GPU worker restarted under its own name mid-training, a retry of a
retrain whose child ran out of attempts (as the UI's Retry does it), a CPU host whose clock is
ten minutes off, and a Prefect API that is unreachable for longer than the client's own retries.
"""

from __future__ import annotations

import datetime as dt
import inspect
import logging
import re
import threading
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from tasks.dispatch import DispatchConfig, dispatch
from tests.integration import test_multihost as multihost
from tests.integration.fault_proxy import FaultProxy
from tests.integration.gpu_cluster import IMAGE, WORKER_HEARTBEAT_S, Cluster
from tests.integration.prefect_services import Service, all_logs, host_env, processes_under, wait_final, worker_args

pytestmark = pytest.mark.integration

# The session's cluster (tests/integration/conftest.py), shared with test_multihost.py, and its client fixture.
client = multihost.client

LOST_AFTER_S = multihost.LOST_AFTER_S  # the lowest accepted: the runs pulse every 2.5 s
SKEW = dt.timedelta(minutes=10)


def train_parameters(cluster: Cluster, store: str, run_id: str, epochs: int = 1) -> dict[str, Any]:
    return {"data": cluster.data_uri, "store": store, "run_id": run_id,
            "train": {"epochs": epochs, "image_size": IMAGE, "batch_size": 8, "share_cache": True}}


def attempts_of(client: Any, run_id: str) -> list[Any]:
    """The train/gpu flow runs of a training run id, oldest first."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[f"train-{run_id}"])),
                                 sort=FlowRunSort.EXPECTED_START_TIME_ASC)


@pytest.fixture
def skewed_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[dt.timedelta]:
    """This process (the CPU host dispatching) runs SKEW ahead of the server and the GPU host:
    time.time, Prefect's own `now`, and `datetime` as the dispatch modules see it."""
    import prefect.types._datetime as prefect_datetime

    import tasks.dispatch
    import tasks.liveness

    real_time, real_now = time.time, prefect_datetime.now

    class Skewed(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
            return dt.datetime.now(tz) + SKEW

    skewed_datetime = types.SimpleNamespace(datetime=Skewed, timedelta=dt.timedelta, UTC=dt.UTC, timezone=dt.timezone)
    monkeypatch.setattr(time, "time", lambda: real_time() + SKEW.total_seconds())
    monkeypatch.setattr(prefect_datetime, "now", lambda tz="UTC": real_now(tz) + SKEW)
    for module in (tasks.dispatch, tasks.liveness):
        # Every wall clock these modules read is one skewed here: `time.time`, Prefect's `now`, or
        # `datetime` imported as `dt` (a `from datetime import datetime` would read the true time,
        # and a comparison of this host's clock with the server's would pass unskewed).
        source = inspect.getsource(module)
        assert not re.search(r"from (datetime|time) import|utcnow\(|monotonic_ns|perf_counter", source), module
        assert ("import datetime as dt" in source) == hasattr(module, "dt"), module
        if hasattr(module, "dt"):
            monkeypatch.setattr(module, "dt", skewed_datetime)
    yield SKEW


def test_a_cpu_host_clock_ten_minutes_ahead_does_not_crash_a_healthy_run(
    cluster: Cluster, client: Any, skewed_clock: dt.timedelta
) -> None:
    cluster.gpu_host("gpu-host-skew")
    run_id = "skewed-clock-1"
    store = f"s3://{cluster.bucket}/skew"
    assert abs(time.time() - dt.datetime.now(dt.UTC).timestamp() - skewed_clock.total_seconds()) < 5
    # The old check (now on this host minus the worker's server-stamped heartbeat > 3 heartbeats)
    # called the worker dead at the first poll and crashed the run.
    result = dispatch.fn("train", "train/gpu", train_parameters(cluster, store, run_id), run_id,
                         DispatchConfig(timeout_s=600, attempts=1, poll_s=2, lost_after_s=LOST_AFTER_S))
    [attempt] = attempts_of(client, run_id)
    assert attempt.state.is_completed(), f"{attempt.state.name}: {attempt.state.message}\n{all_logs(cluster.services)}"
    assert result == {"flow_run_ids": [str(attempt.id)], "attempts": 1}


def test_a_bound_shorter_than_the_servers_event_flush_allows_is_refused_before_anything_is_dispatched(
    cluster: Cluster, client: Any
) -> None:
    from tasks.liveness import lowest_lost_after_s, server_event_flush_s

    # The cluster's server persists events every second (tests/integration/prefect_services.py), and
    # says so: the floor is the pulses' own, not the 20 s a server at Prefect's default 5 s needs.
    assert server_event_flush_s(client) == 1.0
    assert lowest_lost_after_s(server_event_flush_s(client)) == LOST_AFTER_S
    run_id = "bound-too-short-1"
    with pytest.raises(RuntimeError, match=r"lost_after_seconds is 9, below 10, .* every 1 s"):
        dispatch.fn("train", "train/gpu", train_parameters(cluster, f"s3://{cluster.bucket}/short", run_id), run_id,
                    DispatchConfig(timeout_s=600, attempts=1, poll_s=1, lost_after_s=LOST_AFTER_S - 1))
    assert attempts_of(client, run_id) == []


@pytest.mark.parametrize("pulse_seconds", [2.5, None])
def test_a_run_heartbeating_without_the_pulses_it_was_asked_for_is_held_to_the_dispatchers_bound(
    cluster: Cluster, client: Any, pulse_seconds: float | None
) -> None:
    """Prefect's engine sends a run's first heartbeat a moment before the flow body sends its first
    pulse; a host killed in that moment leaves a run heard heartbeating only. Asked to pulse, it is
    called lost on the dispatcher's bound, not on the 45 s a run that never pulses gets."""
    import uuid

    from prefect import flow as prefect_flow
    from prefect.events import Event

    from tasks.liveness import HEARTBEAT_ONLY_BOUND_S, observe, process_alive

    @prefect_flow(name="liveness-probe")
    def probe(pulse_seconds: float | None = None) -> None: ...

    # Not on a work pool: no worker of the module's hosts takes it.
    run = client.create_flow_run(probe, parameters={"pulse_seconds": pulse_seconds})
    heartbeat = Event(event="prefect.flow-run.heartbeat", id=uuid.uuid4(),
                      resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"})
    client.request("POST", "/events", json=[heartbeat.model_dump(mode="json")]).raise_for_status()
    deadline = time.monotonic() + 30
    while (evidence := observe(client, run.id, {})[1]).run_heartbeat is None:
        assert time.monotonic() < deadline, "the heartbeat never reached the event store"
        time.sleep(0.5)
    assert evidence.pulses_asked is (pulse_seconds is not None) and not evidence.run_pulses
    alive, why = process_alive(evidence, LOST_AFTER_S + 1, 0, LOST_AFTER_S)
    if pulse_seconds is None:  # a flow that does not pulse: Prefect's heartbeats are 30 s apart
        assert alive and process_alive(evidence, HEARTBEAT_ONLY_BOUND_S + 1, 0, LOST_AFTER_S)[0] is False
    else:
        assert alive is False and why.startswith(f"flow run stopped heartbeating (none for {LOST_AFTER_S + 1:.0f}s")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_dispatch_waits_out_a_prefect_api_outage_longer_than_the_clients_retries(
    cluster: Cluster, client: Any
) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    cluster.gpu_host("gpu-host-outage")
    run_id = "api-outage-1"
    store = f"s3://{cluster.bucket}/outage"
    # The CPU host reaches the API through a proxy that the test takes down; the GPU host does not.
    proxy = FaultProxy(cluster.api_url.removesuffix("/api"))
    proxy.start()
    logged = Collect()
    logging.getLogger("tasks.dispatch").addHandler(logged)
    outcome: dict[str, Any] = {}

    def cpu_host() -> None:
        # One client retry (about 2 s): the outage below lasts ten times that.
        with temporary_settings(updates={PREFECT_API_URL: f"{proxy.endpoint}/api", PREFECT_CLIENT_MAX_RETRIES: 1}):
            try:
                outcome["result"] = dispatch.fn("train", "train/gpu", train_parameters(cluster, store, run_id), run_id,
                                                DispatchConfig(timeout_s=600, attempts=1, poll_s=1,
                                                               lost_after_s=LOST_AFTER_S, api_outage_s=300))
            except Exception as exc:  # reported by the assertions below
                outcome["error"] = exc

    dispatcher = threading.Thread(target=cpu_host, daemon=True)
    dispatcher.start()
    try:
        deadline = time.monotonic() + multihost.RUN_TIMEOUT_S
        while not (runs := attempts_of(client, run_id)) or runs[0].state_type.value != "RUNNING":
            assert time.monotonic() < deadline and dispatcher.is_alive(), f"{outcome}\n{all_logs(cluster.services)}"
            time.sleep(0.5)
        proxy.stop()
        down_at = time.monotonic()
        # Training finishes and reports while the CPU host cannot reach the API.
        wait_final(client, runs[0].id, multihost.RUN_TIMEOUT_S, cluster.services)
        time.sleep(max(0.0, 20 - (time.monotonic() - down_at)))
        outage_s = time.monotonic() - down_at
        assert dispatcher.is_alive(), f"the dispatch ended during the outage: {outcome}"
        proxy.start()
        dispatcher.join(timeout=120)
    finally:
        proxy.stop()
        logging.getLogger("tasks.dispatch").removeHandler(logged)
    assert not dispatcher.is_alive(), "the dispatch did not finish after the API came back"
    assert "error" not in outcome, f"{outcome['error']!r}\n{all_logs(cluster.services)}"
    [attempt] = attempts_of(client, run_id)
    assert outcome["result"] == {"flow_run_ids": [str(attempt.id)], "attempts": 1}
    unreachable = [m for m in logged.messages if m.startswith("Prefect API unreachable while watching flow run")]
    assert len(unreachable) >= 3, logged.messages  # the outage outlasted the client's retries, several times
    print(f"\nAPI outage: {outage_s:.0f}s, {len(unreachable)} waits by the dispatch, then it completed")


def test_a_worker_restarted_under_its_name_is_caught_and_a_retried_parent_resumes_the_training(
    cluster: Cluster, client: Any
) -> None:
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    from protein.modeling.checkpoints import load_checkpoint
    from protein.registry import Registry
    from protein.storage import open_store

    epochs, name = 5, "gpu-host-restarted"
    worker, worker_dir = cluster.gpu_host(name)
    store_uri = f"s3://{cluster.bucket}/retried"
    store = open_store(store_uri)
    nightly = client.read_deployment_by_name("retrain/nightly")
    parameters = {**multihost.retrain_parameters(cluster, store_uri, epochs),
                  "dispatch": {"timeout_minutes": 10, "attempts": 1, "poll_seconds": 2,
                               "lost_after_seconds": LOST_AFTER_S}}
    parent = client.create_flow_run_from_deployment(nightly.id, parameters=parameters)

    deadline = time.monotonic() + multihost.RUN_TIMEOUT_S
    while not (checkpoints := [k for k in store.list("runs/") if k.endswith("/checkpoint.pt")]):
        assert time.monotonic() < deadline, f"no checkpoint in time\n{all_logs(cluster.services)}"
        assert not client.read_flow_run(parent.id).state.is_final()
        time.sleep(0.2)
    [checkpoint] = checkpoints
    run_id = checkpoint.split("/")[1]
    # systemd restarts the unit: every process of the host dies, a new worker of the same name starts.
    worker.kill(worker_dir)
    killed_at = load_checkpoint(store, run_id)["epoch"]
    assert killed_at < epochs, "the kill landed after training finished; the test proves nothing then"
    assert not processes_under(worker_dir)
    same_host = host_env(cluster.env, worker_dir, {"PROTEIN_ALLOW_CPU": "1",
                                                   "PREFECT_WORKER_HEARTBEAT_SECONDS": WORKER_HEARTBEAT_S})
    restarted = Service(f"worker-{name}-restarted", worker_args("gpu", name), same_host, cluster.root, cwd=worker_dir)
    cluster.services.append(restarted)
    killed = time.monotonic()

    # Caught by the run's silence (not by the 10-minute timeout), with its one attempt spent.
    parent = wait_final(client, parent.id, LOST_AFTER_S + 180, cluster.services)
    caught_s = time.monotonic() - killed
    assert parent.state.is_failed(), f"{parent.state.name}: {parent.state.message}\n{all_logs(cluster.services)}"
    assert "did not complete in 1 attempts" in parent.state.message, parent.state.message
    [lost] = attempts_of(client, run_id)
    assert lost.state.type == StateType.CRASHED, lost.state
    multihost.assert_lost_on_pulses(lost.state.message)

    # Retry, as the UI's Retry button does it (Prefect 3.9): AwaitingRetry, forced.
    client.set_flow_run_state(parent.id, State(type=StateType.SCHEDULED, name="AwaitingRetry",
                                               message="Retry from the UI"), force=True)
    parent = wait_final(client, parent.id, multihost.RUN_TIMEOUT_S, cluster.services)
    assert parent.state.is_completed(), f"{parent.state.message}\n{all_logs(cluster.services)}"
    assert parent.run_count == 2

    first, second = attempts_of(client, run_id)
    assert first.id == lost.id and first.state.type == StateType.CRASHED
    assert second.state.is_completed() and second.parameters["run_id"] == run_id
    assert second.idempotency_key == first.idempotency_key.replace("-attempt-1", "-attempt-2")
    messages = [log.message for log in multihost.run_logs(client, second.id)]
    assert f"resuming run {run_id} after epoch {killed_at}" in messages, [m for m in messages if "resum" in m]

    registry = Registry(store)
    [version] = registry.versions()  # exactly one version for the training run
    assert registry.find_by_run(run_id) == version == registry.champion().champion
    assert [h["epoch"] for h in registry.spec(version)["history"]] == list(range(1, epochs + 1))
    print(f"\nrestarted worker: lost run caught {caught_s:.0f}s after the kill (bound {LOST_AFTER_S}s + polls); "
          f"the retried parent resumed after epoch {killed_at} of {epochs}")
