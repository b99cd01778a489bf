"""A run's silence against a server whose event persister stops: in Prefect's HA layout the APIs
only accept events, and `prefect server services start` persists them; while it is down every run
looks silent. Played on a fake server and a fake clock: the run pulses, the persister flushes, the
dispatcher polls, all in whole seconds."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prefect.client.schemas.objects import StateType
from prefect.states import Running, State

import tasks.dispatch
import tasks.liveness
from tasks.dispatch import DispatchConfig, Step, decide, wait_for
from tasks.liveness import PULSE_EVENT, Watch, observe, pulse_interval_s

T0 = dt.datetime(2026, 12, 4, 2, 0, tzinfo=dt.UTC)
RUN_ID = uuid.UUID(int=7)
LOST_AFTER_S = 120
POLL_S = 5
FLUSH_S = 5  # Prefect's default event flush
PULSE_S = int(pulse_interval_s(LOST_AFTER_S))  # 30: as the dispatcher asks its runs
TIMEOUT_S = 6 * 3600


@dataclass(frozen=True)
class Stall:
    """The event persister is down from start_s until end_s (None: for good)."""

    start_s: int
    end_s: int | None = None
    # What the APIs accepted meanwhile is lost (Redis trims a stream no live consumer reads),
    # rather than persisted when the persister comes back.
    drops: bool = False

    def covers(self, t: int) -> bool:
        return self.start_s <= t and (self.end_s is None or t < self.end_s)


@dataclass(frozen=True)
class ClockStep:
    """A host steps its clock back by back_s at at_s (an NTP step): what it sends from then on is
    stamped `occurred` back_s earlier than the server's time."""

    at_s: int
    back_s: int

    def back_at(self, t: int) -> int:
        return self.back_s if t >= self.at_s else 0


@dataclass
class FakeServer:
    """The Prefect API as the dispatcher uses it: events it accepts (POST /events, the run's
    pulses) get `received` and become readable only when the persister flushes them. A query
    returns them newest `occurred` first, the sender's clock, as Prefect's event storage does."""

    run_dies_at: int | None = None
    stall: Stall | None = None
    run_clock_step: ClockStep | None = None
    dispatcher_clock_step: ClockStep | None = None
    now_s: int = -1
    accepted: list[SimpleNamespace] = field(default_factory=list)
    persisted: list[SimpleNamespace] = field(default_factory=list)
    states_set: list[State] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run = SimpleNamespace(id=RUN_ID, created=T0, labels={}, work_pool_name=None,
                                   parameters={"pulse_seconds": PULSE_S}, state=Running())
        self.advance(0)

    def advance(self, to_s: float) -> None:
        for t in range(self.now_s + 1, int(to_s) + 1):
            self.now_s = t
            if (self.run_dies_at is None or t < self.run_dies_at) and t % PULSE_S == 0:
                self.accept(PULSE_EVENT, f"prefect.flow-run.{RUN_ID}",
                            self.run_clock_step.back_at(t) if self.run_clock_step else 0)
            if self.stall and self.stall.drops and t == self.stall.end_s:
                self.accepted.clear()
            if not (self.stall and self.stall.covers(t)) and t % FLUSH_S == 0:
                self.persisted += self.accepted
                self.accepted = []

    def accept(self, event: str, resource_id: str, clock_back_s: int = 0) -> None:
        self.accepted.append(SimpleNamespace(event=event, resource_id=resource_id,
                                             received=T0 + dt.timedelta(seconds=self.now_s),
                                             occurred=T0 + dt.timedelta(seconds=self.now_s - clock_back_s)))

    def request(self, method: str, path: str, json: list[dict[str, Any]]) -> httpx.Response:
        assert (method, path) == ("POST", "/events")
        for event in json:  # the dispatcher's probes
            self.accept(event["event"], event["resource"]["prefect.resource.id"],
                        self.dispatcher_clock_step.back_at(self.now_s) if self.dispatcher_clock_step else 0)
        return httpx.Response(204, request=httpx.Request(method, f"http://prefect.test/api{path}"))

    def read_flow_run(self, flow_run_id: Any) -> SimpleNamespace:
        return self.run

    def read_events(self, filter: Any, limit: int) -> SimpleNamespace:
        ids = (filter.resource or filter.any_resource).id
        found = [e for e in self.persisted if e.event in filter.event.name and e.resource_id in ids
                 and filter.occurred.since <= e.occurred <= filter.occurred.until]
        newest_first = sorted(found, key=lambda e: e.occurred, reverse=True)  # Prefect orders by occurred
        return SimpleNamespace(events=newest_first[:limit], total=len(found))

    def set_flow_run_state(self, flow_run_id: Any, state: State, force: bool = False) -> None:
        self.states_set.append(state)
        self.run.state = state

    def read_task_runs(self, **filters: Any) -> list[Any]:
        return []


def poll(server: FakeServer, until_s: int, logger: logging.Logger) -> dict[int, Step]:
    """What the dispatcher decides at each poll, from 10 s on (the run has pulsed by then)."""
    watch = Watch(f"flow run {RUN_ID}", LOST_AFTER_S, POLL_S, logger)
    steps: dict[int, Step] = {}
    for t in range(10, until_s + 1, POLL_S):
        server.advance(t)
        _, evidence = observe(server, RUN_ID, {})  # type: ignore[arg-type]
        alive, _ = watch.judge(evidence, now=float(t))
        steps[t] = decide(StateType.RUNNING, True, alive, t, TIMEOUT_S)
    return steps


def first_lost(steps: dict[int, Step]) -> int | None:
    return next((t for t, step in steps.items() if step is Step.LOST), None)


@pytest.mark.parametrize("run_dies_at", [None, 150])
def test_no_run_is_called_lost_while_the_server_persists_no_events(
        run_dies_at: int | None, caplog: pytest.LogCaptureFixture) -> None:
    """The services process is down from 100 s on: neither the run's pulses nor the dispatcher's
    own probes are persisted. Its silence proves nothing, alive (two GPUs would train the run) or
    dead (found once events flow again, or by the timeout)."""
    server = FakeServer(run_dies_at=run_dies_at, stall=Stall(start_s=100))
    with caplog.at_level(logging.WARNING):
        steps = poll(server, 900, logging.getLogger("test"))
    assert set(steps.values()) == {Step.WAIT}, f"lost at {first_lost(steps)} s"
    [stalled] = [r.getMessage() for r in caplog.records]  # said once, not at every poll
    assert "events are not being persisted" in stalled and "prefect server services start" in stalled


def test_a_run_whose_beats_stop_is_lost_while_the_dispatchers_own_events_are_persisted() -> None:
    server = FakeServer(run_dies_at=100)  # last pulse at 90 s
    lost_at = first_lost(poll(server, 900, logging.getLogger("test")))
    assert lost_at is not None and 90 + LOST_AFTER_S < lost_at <= 90 + LOST_AFTER_S + 2 * POLL_S


@pytest.mark.parametrize("run_dies_at", [None, 700])
def test_a_run_whose_hosts_clock_steps_back_is_judged_by_the_beats_that_arrive(run_dies_at: int | None) -> None:
    """The GPU host's clock steps back 10 minutes (past the bound) at 400 s: its pulses from then on
    sort below the fourteen it sent before (0-390 s), so a query's page of the newest by `occurred`
    holds only old ones until its clock passes 390 s again (at 990 s). Before, the run was called
    lost at ~515 s while it pulsed, crashed and trained twice. One that dies is still lost."""
    server = FakeServer(run_dies_at=run_dies_at, run_clock_step=ClockStep(at_s=400, back_s=600))
    lost_at = first_lost(poll(server, 1200, logging.getLogger("test")))
    if run_dies_at is None:
        assert lost_at is None, f"lost at {lost_at} s"
    else:  # last pulse at 690 s
        assert lost_at is not None and 690 + LOST_AFTER_S < lost_at <= 690 + LOST_AFTER_S + 2 * POLL_S


def test_a_dispatcher_whose_clock_steps_back_still_sees_its_probes_persisted(caplog: pytest.LogCaptureFixture) -> None:
    """The same step on the CPU host: its probes sort below the ones before it. Before, the persister
    looked stalled for 10 minutes, and a run that died meanwhile was not called lost until the
    clock had caught up."""
    server = FakeServer(run_dies_at=700, dispatcher_clock_step=ClockStep(at_s=400, back_s=600))
    with caplog.at_level(logging.WARNING):
        lost_at = first_lost(poll(server, 1200, logging.getLogger("test")))
    assert lost_at is not None and 690 + LOST_AFTER_S < lost_at <= 690 + LOST_AFTER_S + 2 * POLL_S
    assert caplog.records == []


@pytest.mark.parametrize(("run_dies_at", "drops"), [
    (100, False),  # dead before the stall: lost a whole bound after events flow again, not at once
    (100, True),
    (None, True),  # alive, its pulses of the stall lost: its next pulse comes within the fresh bound
    (None, False),
])
def test_after_a_stall_the_runs_silence_counts_afresh(
        run_dies_at: int | None, drops: bool, caplog: pytest.LogCaptureFixture) -> None:
    server = FakeServer(run_dies_at=run_dies_at, stall=Stall(start_s=100, end_s=400, drops=drops))
    with caplog.at_level(logging.WARNING):
        lost_at = first_lost(poll(server, 900, logging.getLogger("test")))
    # The last probe read before the stall is read at 95 s; the first after it at 400 s (the
    # backlog, flushed at 400 s) or at 405 s (the probe sent at 400 s, the backlog dropped).
    seen_again = 405 if drops else 400
    if run_dies_at is None:
        assert lost_at is None
    else:
        assert lost_at is not None and seen_again + LOST_AFTER_S < lost_at <= seen_again + LOST_AFTER_S + 2 * POLL_S
    stalled, resumed = (r.getMessage() for r in caplog.records)
    assert "events are not being persisted" in stalled
    assert resumed == (f"events are persisted again after {seen_again - 95}s: the silence of flow run {RUN_ID} "
                       "counts afresh")


def test_the_dispatch_waits_on_a_stalled_event_pipeline_until_the_attempts_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """wait_for itself, on the fake server and clock: a healthy run is never crashed for the
    persister's silence; the attempt's timeout bounds the wait, as for any attempt."""
    server = FakeServer(stall=Stall(start_s=100))
    monkeypatch.setattr(tasks.dispatch, "get_client", lambda sync_client: nullcontext(server))
    monkeypatch.setattr(tasks.dispatch, "time", SimpleNamespace(
        monotonic=lambda: float(server.now_s), sleep=lambda s: server.advance(server.now_s + s)))
    step, described, started = wait_for(RUN_ID, DispatchConfig(timeout_s=600, poll_s=POLL_S,
                                                               lost_after_s=LOST_AFTER_S), logging.getLogger("test"))
    assert step is Step.TIMED_OUT and started, described
    assert [state.type for state in server.states_set] == [StateType.CANCELLING]
    assert 600 < server.now_s <= 600 + POLL_S


def test_a_run_no_worker_has_taken_is_neither_probed_nor_read_for_evidence() -> None:
    """Queued behind the GPU slots (Scheduled, Late) there is no process to judge: a poll reads the
    run and sends nothing (at a 5 s poll, probes would store 720 events an hour of queueing)."""
    from prefect.states import Late, Pending, Scheduled

    server = FakeServer(run_dies_at=0)
    reads: list[Any] = []
    read_events = server.read_events
    server.read_events = lambda filter, limit: reads.append(filter) or read_events(filter, limit)  # type: ignore[method-assign]
    for state in (Scheduled(), Late()):
        server.run.state = state
        server.advance(server.now_s + FLUSH_S)
        run, evidence = observe(server, RUN_ID, {})  # type: ignore[arg-type]
        assert run is server.run and evidence == tasks.liveness.Evidence()
    assert server.accepted == server.persisted == [] and reads == []

    server.run.state = Pending()  # a worker took it: its process is judged from now on
    observe(server, RUN_ID, {})  # type: ignore[arg-type]
    assert [e.event for e in server.accepted] == [tasks.liveness.PROBE_EVENT] and reads
