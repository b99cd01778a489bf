"""The pure decisions behind dispatching training to another host: what to do about an attempt,
and which device a run may use."""

from __future__ import annotations

import dataclasses as dc
import datetime as dt
import logging
from uuid import uuid4

import httpx
import pytest
from prefect.client.schemas.objects import StateType

from protein.modeling.devices import DevicePolicy, DeviceUnavailable, choose_device
from tasks.dispatch import (
    DispatchConfig,
    Resume,
    Step,
    api_unreachable,
    attempt_prefix,
    backoff_s,
    decide,
    idempotency_key,
    plan,
    through_outage,
)
from tasks.liveness import (
    DEFAULT_EVENT_FLUSH_S,
    PULSE_EVENT,
    Evidence,
    Silence,
    lost_after_problem,
    lowest_lost_after_s,
    process_alive,
    pulse_interval_s,
    pulsing,
    server_event_flush_s,
)
from tests.conftest import MotoServer
from tests.helpers import ModuleClock

GPU_POOL = DevicePolicy(require_cuda=True)


@pytest.mark.parametrize(("state", "started", "alive", "elapsed", "step"), [
    (StateType.COMPLETED, True, None, 10, Step.DONE),
    (StateType.CRASHED, True, None, 10, Step.LOST),
    (StateType.FAILED, True, True, 10, Step.FAILED),
    (StateType.CANCELLED, True, None, 10, Step.FAILED),
    (StateType.RUNNING, True, True, 10, Step.WAIT),
    (StateType.RUNNING, True, False, 10, Step.LOST),  # the worker under a running attempt died
    (StateType.PENDING, False, False, 10, Step.LOST),
    (StateType.SCHEDULED, False, None, 10, Step.WAIT),  # queued for a free GPU slot
    (StateType.RUNNING, True, True, 101, Step.TIMED_OUT),
    (StateType.SCHEDULED, False, None, 101, Step.NEVER_STARTED),  # no gpu worker took it
    (StateType.COMPLETED, True, None, 101, Step.DONE),  # a result beats the clock
])
def test_decide(state: StateType, started: bool, alive: bool | None, elapsed: float, step: Step) -> None:
    assert decide(state, started, alive, elapsed, timeout_s=100) is step


PARAMETERS = {"data": "s3://b/p/datasets/ab12/", "run_id": "ab12cd34-0f0f0f0f", "train": {"epochs": 3}}


def test_attempts_are_keyed_by_what_their_result_depends_on_and_by_number() -> None:
    prefix = attempt_prefix("train", "ab12cd34-0f0f0f0f", "train/gpu", PARAMETERS)
    assert prefix == attempt_prefix("train", "ab12cd34-0f0f0f0f", "train/gpu", dict(reversed(PARAMETERS.items())))
    assert idempotency_key(prefix, 1) != idempotency_key(prefix, 2)
    # Training and both scoring steps of one run are different runs, never deduplicated into one.
    assert len({attempt_prefix(step, "ab12cd34-0f0f0f0f", "train/gpu", PARAMETERS)
                for step in ("train", "score-gate", "score-predict")}) == 3
    # Scoring against another champion (after a promotion) is another result: not the old record.
    assert prefix != attempt_prefix("train", "ab12cd34-0f0f0f0f", "train/gpu", {**PARAMETERS, "champion": "v2"})
    assert prefix != attempt_prefix("train", "ab12cd34-0f0f0f0f", "train/gpu-big", PARAMETERS)


S = StateType


@pytest.mark.parametrize(("attempts", "abandoned", "expected"), [
    ({}, (), (Resume.DISPATCH, 1)),  # the first dispatch
    ({1: S.COMPLETED}, (), (Resume.REUSE, 1)),  # a retried parent whose child completed
    ({1: S.CRASHED, 2: S.COMPLETED}, (), (Resume.REUSE, 2)),
    ({1: S.FAILED}, (), (Resume.DISPATCH, 2)),  # retried after a real failure: try again, resuming
    ({1: S.CANCELLED}, (), (Resume.DISPATCH, 2)),  # cancelled on timeout
    ({1: S.CRASHED, 2: S.CRASHED, 3: S.CRASHED}, (), (Resume.DISPATCH, 4)),  # all attempts had crashed
    ({1: S.CANCELLING}, (), (Resume.DISPATCH, 2)),  # on its way to Cancelled
    ({1: S.CRASHED, 2: S.RUNNING}, (), (Resume.ATTACH, 2)),  # the parent died, its child did not
    ({1: S.PENDING}, (), (Resume.ATTACH, 1)),
    ({1: S.SCHEDULED}, (), (Resume.ATTACH, 1)),  # queued for a GPU slot
    ({1: S.RUNNING}, (1,), (Resume.DISPATCH, 2)),  # given up on here, whatever the server still says
])
def test_plan(attempts: dict[int, StateType], abandoned: tuple[int, ...], expected: tuple[Resume, int]) -> None:
    assert plan(attempts, abandoned) == expected


T0 = dt.datetime(2026, 12, 4, 2, 0, tzinfo=dt.UTC)
HEARTBEATING = Evidence(run_heartbeat=T0, worker="gpu-a-0")
TOOK_IT = Evidence(worker="gpu-a-0", worker_heartbeat=T0 + dt.timedelta(seconds=50),
                   worker_started=T0 - dt.timedelta(hours=3), handed_over=T0)


@pytest.mark.parametrize(("evidence", "run_silent", "worker_silent", "alive", "why"), [
    (HEARTBEATING, 60, 0, True, ""),
    (HEARTBEATING, 121, 0, False, "flow run stopped heartbeating (none for 121s; worker gpu-a-0)"),
    # A run that heartbeats answers for itself, even when its worker is gone or was restarted.
    (dc.replace(HEARTBEATING, worker_started=T0 + dt.timedelta(seconds=1), handed_over=T0), 10, 500, True, ""),
    (Evidence(), 0, 0, None, ""),  # no worker took it yet
    (TOOK_IT, 0, 60, True, ""),
    (TOOK_IT, 0, 121, False, "worker gpu-a-0 stopped heartbeating (none for 121s)"),
    # Restarted under the same name after it took the run: heartbeating, but a new process.
    (dc.replace(TOOK_IT, worker_started=T0 + dt.timedelta(seconds=5)), 0, 0, False,
     "worker gpu-a-0 restarted after it took the run (started 02:00:05, took the run 02:00:00 server time)"),
])
def test_process_alive(evidence: Evidence, run_silent: float, worker_silent: float, alive: bool | None,
                       why: str) -> None:
    verdict, reason = process_alive(evidence, run_silent, worker_silent, lost_after_s=120)
    assert verdict is alive
    assert reason.startswith(why)


PULSING = dc.replace(HEARTBEATING, run_pulses=True)


@pytest.mark.parametrize(("evidence", "run_silent", "worker_silent", "alive"), [
    # A pulsing run is held to the dispatcher's bound, however short.
    (PULSING, 20, 0, True),
    (PULSING, 21, 0, False),
    # Heard only through Prefect's heartbeats (30 s apart at best): never lost before 45 s of silence.
    (HEARTBEATING, 44, 0, True),
    (HEARTBEATING, 46, 0, False),
    # Unless it was asked to pulse: its first pulse follows its first heartbeat at once, so a run
    # heartbeating without pulsing died in between (killed right as it started).
    (dc.replace(HEARTBEATING, pulses_asked=True), 20, 0, True),
    (dc.replace(HEARTBEATING, pulses_asked=True), 21, 0, False),
    # Before the run's first beat, its worker gets two of its own heartbeat intervals (30 s when unknown).
    (dc.replace(TOOK_IT, worker_interval_s=5), 0, 21, False),
    (dc.replace(TOOK_IT, worker_interval_s=30), 0, 59, True),
    (dc.replace(TOOK_IT, worker_interval_s=30), 0, 61, False),
    (TOOK_IT, 0, 59, True),
])
def test_a_short_bound_applies_only_to_what_beats_often_enough_for_it(
        evidence: Evidence, run_silent: float, worker_silent: float, alive: bool) -> None:
    verdict, _ = process_alive(evidence, run_silent, worker_silent, lost_after_s=20)
    assert verdict is alive


@pytest.mark.parametrize(("event_flush_s", "lowest"), [
    (5.0, 20.0),  # Prefect's default flush: the floor a server that does not say gets
    (10.0, 40.0),  # a server that persists less often needs a longer bound
    (1.0, 10.0),  # the test stacks' flush: the bound is the pulses' own floor
    (0.5, 10.0),
])
def test_the_lowest_lost_after_bound_follows_the_servers_event_flush(event_flush_s: float, lowest: float) -> None:
    assert lowest_lost_after_s(event_flush_s) == lowest
    assert lost_after_problem(lowest, event_flush_s) is None
    problem = lost_after_problem(lowest - 1, event_flush_s)
    assert problem is not None and f"below {lowest:g}" in problem and f"every {event_flush_s:g} s" in problem


def test_an_api_that_does_not_say_its_event_flush_is_taken_at_prefects_default(s3_server: MotoServer) -> None:
    """An HTTP API without Prefect's settings endpoint (here a real moto_server, which answers 404,
    as Prefect Cloud has no /admin/settings) gets Prefect's default flush, so the 20 s floor."""
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api=s3_server.endpoint) as client:
        assert server_event_flush_s(client) == DEFAULT_EVENT_FLUSH_S == 5.0
    assert lowest_lost_after_s(DEFAULT_EVENT_FLUSH_S) == 20.0


def test_a_run_pulses_four_times_in_its_dispatchers_bound_from_its_own_thread(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    import prefect.events
    import prefect.runtime

    sent: list[tuple[str, dict[str, str], str]] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda event, resource: sent.append(
        (event, resource, threading.current_thread().name)))
    monkeypatch.setattr(prefect.runtime.flow_run, "id", "run-1")
    assert pulse_interval_s(20) == 5 and pulse_interval_s(2) == 1.0
    with pulsing(0.05):
        time.sleep(0.28)
    count = len(sent)
    time.sleep(0.15)
    assert len(sent) == count, "pulses went on after the block ended"
    assert 4 <= count <= 7, count  # one at the start, then one every 0.05 s
    assert all(one == (PULSE_EVENT, {"prefect.resource.id": "prefect.flow-run.run-1"}, "protein-pulse") for one in sent)
    with pulsing(None):  # a run started by hand: no pulse
        time.sleep(0.06)
    assert len(sent) == count


def test_silence_counts_from_the_last_change_of_a_server_stamped_value() -> None:
    silence = Silence()
    assert silence.of("run", T0, now=1000.0) == 0.0
    assert silence.of("run", T0, now=1030.0) == 30.0
    assert silence.of("run", T0 + dt.timedelta(seconds=30), now=1031.0) == 0.0  # a new heartbeat
    assert silence.of("run", T0 + dt.timedelta(seconds=30), now=1100.0) == 69.0
    silence.forget()  # after an API outage: what happened meanwhile is unknown
    assert silence.of("run", T0 + dt.timedelta(seconds=30), now=2000.0) == 0.0


def test_api_outage_is_waited_out_and_other_errors_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    request = httpx.Request("POST", "http://127.0.0.1:1/api/flow_runs/filter")
    assert api_unreachable(httpx.ConnectError("refused", request=request))
    assert api_unreachable(httpx.RemoteProtocolError("disconnected", request=request))
    assert api_unreachable(httpx.HTTPStatusError("bad gateway", request=request,
                                                 response=httpx.Response(502, request=request)))
    assert not api_unreachable(httpx.HTTPStatusError("conflict", request=request,
                                                     response=httpx.Response(409, request=request)))
    assert not api_unreachable(ValueError("not found"))
    assert [backoff_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]

    slept: list[float] = []
    monkeypatch.setattr("tasks.dispatch.time", ModuleClock(sleep=slept.append))
    failures = iter([httpx.ConnectError("refused", request=request)] * 3)

    def call() -> str:
        if (error := next(failures, None)) is not None:
            raise error
        return "answered"

    config = DispatchConfig(api_outage_s=600)
    assert through_outage(call, config, logging.getLogger("test"), "reading") == ("answered", True)
    assert slept == [1, 2, 4]
    with pytest.raises(RuntimeError, match=r"stayed unreachable for over 0s while reading: ConnectError"):
        through_outage(lambda: (_ for _ in ()).throw(httpx.ConnectError("refused", request=request)),
                       DispatchConfig(api_outage_s=0), logging.getLogger("test"), "reading")
    with pytest.raises(ValueError, match="a real answer"):
        through_outage(lambda: (_ for _ in ()).throw(ValueError("a real answer")), config,
                       logging.getLogger("test"), "reading")
    # The database behind the API restarting: Prefect answers 500 until it is back.
    database_down = httpx.HTTPStatusError("internal server error", request=request,
                                          response=httpx.Response(500, request=request))
    assert api_unreachable(database_down)
    outage = iter([database_down] * 2)

    def answered_after_the_database() -> str:
        if (error := next(outage, None)) is not None:
            raise error
        return "answered"

    assert through_outage(answered_after_the_database, config, logging.getLogger("test"),
                          "reading") == ("answered", True)
    assert slept == [1, 2, 4, 1, 2]


def test_gpu_pool_without_cuda_fails_loudly_unless_cpu_is_allowed() -> None:
    with pytest.raises(DeviceUnavailable, match="requires a CUDA GPU .* set PROTEIN_ALLOW_CPU=1"):
        choose_device("auto", 0, None, GPU_POOL)
    assert choose_device("auto", 0, None, DevicePolicy(require_cuda=True, allow_cpu=True)) == "cpu"
    assert choose_device("auto", 0, None, DevicePolicy()) == "auto"  # local development: anything goes


def test_one_card_per_worker() -> None:
    assert choose_device("auto", 1, "3", GPU_POOL) == "cuda"
    with pytest.raises(DeviceUnavailable, match="sees 4 CUDA devices and CUDA_VISIBLE_DEVICES is unset"):
        choose_device("auto", 4, None, GPU_POOL)
    with pytest.raises(DeviceUnavailable, match="device 'cpu' requested on the gpu pool"):
        choose_device("cpu", 1, "0", GPU_POOL)


def test_policy_reads_the_environment() -> None:
    assert DevicePolicy.from_env({"PROTEIN_REQUIRE_CUDA": "1", "PROTEIN_ALLOW_CPU": "true"}) == DevicePolicy(True, True)
    assert DevicePolicy.from_env({}, allow_cpu=True) == DevicePolicy(False, True)
    assert DevicePolicy.from_env({"PROTEIN_REQUIRE_CUDA": "0"}) == DevicePolicy()


class _Attempt:
    """A dispatched flow run as existing_attempts returns it."""

    def __init__(self, number: int) -> None:
        self.id, self.name, self.state_type, self.state_name = f"run-{number}", f"train-r-{number}", None, "Scheduled"


def dispatch_with(monkeypatch: pytest.MonkeyPatch, outcomes: list[tuple[Step, bool]],
                  config: DispatchConfig) -> tuple[list[float], list[int], dict | Exception]:
    """dispatch.fn against stubs: attempt n ends as outcomes[n - 1] (step, whether it ever ran).
    Returns the sleeps between attempts, the attempts dispatched, and the result or the error."""
    import tasks.dispatch as dispatch_module

    created: dict[int, _Attempt] = {}
    slept: list[float] = []

    def run_deployment(name: str, parameters: dict, timeout: int, flow_run_name: str, idempotency_key: str):
        number = int(idempotency_key.rsplit("-", 1)[1])
        created[number] = _Attempt(number)
        return created[number]

    def wait_for(flow_run_id: str, config: DispatchConfig, logger: object) -> tuple[Step, str, bool]:
        number = int(flow_run_id.rsplit("-", 1)[1])
        step, started = outcomes[number - 1]
        created[number].state_type = StateType.COMPLETED if step is Step.DONE else StateType.CRASHED
        return step, "Crashed: the clone failed" if not started else "lost mid-epoch", started

    monkeypatch.setattr(dispatch_module, "lost_after_refusal", lambda config, logger=None: None)
    monkeypatch.setattr(dispatch_module, "existing_attempts", lambda prefix: dict(created))
    monkeypatch.setattr(dispatch_module, "run_deployment", run_deployment)
    monkeypatch.setattr(dispatch_module, "wait_for", wait_for)
    monkeypatch.setattr(dispatch_module, "time", ModuleClock(sleep=slept.append))
    try:
        result: dict | Exception = dispatch_module.dispatch.fn("train", "train/gpu", {"data": "d"}, "r", config)
    except RuntimeError as exc:
        result = exc
    return slept, sorted(created), result


def test_an_attempt_lost_before_it_ran_is_dispatched_again_after_a_growing_wait(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A git host down for a minute at 02:00: each attempt's clone fails before the flow runs. Dispatched
    # again at once, all three attempts were spent within a minute and the night was lost.
    config = DispatchConfig(unstarted_backoff_s=60)
    slept, attempts, result = dispatch_with(monkeypatch, [(Step.LOST, False), (Step.LOST, False), (Step.DONE, True)],
                                            config)
    assert slept == [60, 120] and attempts == [1, 2, 3]
    assert result == {"flow_run_ids": ["run-1", "run-2", "run-3"], "attempts": 3}


def test_an_attempt_lost_while_training_is_dispatched_again_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    slept, attempts, result = dispatch_with(monkeypatch, [(Step.LOST, True), (Step.LOST, False), (Step.DONE, True)],
                                            DispatchConfig(unstarted_backoff_s=60))
    assert slept == [0.0, 60] and attempts == [1, 2, 3] and result["attempts"] == 3
    # The last attempt lost: nothing left to wait for.
    slept, _, result = dispatch_with(monkeypatch, [(Step.LOST, False)] * 2, DispatchConfig(attempts=2))
    assert slept == [60, 0.0] and isinstance(result, RuntimeError) and "did not complete in 2 attempts" in str(result)
    with pytest.raises(ValueError, match="unstarted_backoff_s >= 0"):
        DispatchConfig(unstarted_backoff_s=float("nan"))


def test_a_run_crashed_before_it_ran_never_ran_whatever_its_start_time() -> None:
    # Prefect fills in start_time when a run ends, also for one that never ran (its SetEndTime rule):
    # read as "ran", it made the wait before the next attempt never happen.
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Crashed, Pending, Running

    from tasks.dispatch import ever_ran

    now = dt.datetime.now(dt.UTC)
    clone_failed = FlowRun(flow_id=uuid4(), state=Crashed(message="git clone failed"), start_time=now, run_count=0)
    assert not ever_ran(clone_failed)
    assert not ever_ran(FlowRun(flow_id=uuid4(), state=Pending(), run_count=0))
    assert ever_ran(FlowRun(flow_id=uuid4(), state=Running(), run_count=0))  # the poll caught it Running
    assert ever_ran(FlowRun(flow_id=uuid4(), state=Crashed(message="killed"), start_time=now, run_count=1))
