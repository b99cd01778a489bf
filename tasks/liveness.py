"""Is the process under a dispatched flow run alive? Judged from what the Prefect server stamped.

Every time here is one the server wrote: when it received an event (`received`) or recorded a
worker's heartbeat. Event filters need an `occurred` window, and `occurred` is stamped by the
emitting host, so the window is a wide one around the run's server-stamped creation, never "now"
on this host (Prefect's default `until` is this host's clock: a CPU host running behind would
not see the newest heartbeats). A query returns the newest events by `occurred` too, so a sender
whose clock stepped back (an NTP step) sends beats that sort below its older ones, off the page:
a run's beats are also counted (Heard.count), and a count that grows is a run heard, whatever
the beats' `occurred`.

A dispatched run also pulses: while its flow body runs it sends `protein.flow-run.pulse` as often
as its dispatcher asked (a quarter of the dispatcher's lost-after bound). Prefect's own flow-run
heartbeat cannot come more often than every 30 s, which put a floor of about a minute under the
time to call a dead run lost; a run seen pulsing is held to the dispatcher's bound instead.

Silence is evidence only while the server persists events. An event becomes readable once the
server's event persister has written it, and in Prefect's HA layout that persister runs in the
separate `prefect server services start` process (the APIs only accept events and queue them in
Redis): while it is down, every run looks silent. So the dispatcher sends an event of its own
(`protein.dispatch.probe`) at every poll while the run is Pending or Running (JUDGED_STATES) and
reads it back; a run's silence counts only up to the last time a newer probe became readable (Watch).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings.models.server.services import ServerServicesEventPersisterSettings

WORKER_NAME_LABEL = "prefect.worker.name"
WORKER_TYPE_LABEL = "prefect.worker.type"
HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"
PULSE_EVENT = "protein.flow-run.pulse"
# Sent by the dispatcher about each run it watches, through the same API and event pipeline as the
# run's beats; its resource is the dispatch, not the run, so the run's own event feed stays readable.
PROBE_EVENT = "protein.dispatch.probe"
# A run heard only through Prefect's heartbeats (every 30 s at the most often, PREFECT_FLOWS_HEARTBEAT_FREQUENCY)
# is not called lost before this much silence, whatever the dispatcher's bound: the heartbeat plus the
# server's event-persisting delay. Likewise a worker is given two of its own heartbeat intervals.
HEARTBEAT_ONLY_BOUND_S = 45.0
# The shortest lost-after bound a dispatcher may use against any server: its runs pulse every 2.5 s
# for it, so a live run's newest beat, as an event query sees it, is a pulse interval plus the
# server's event flush plus a poll old, ~4 s against a server that flushes every second.
LOWEST_LOST_AFTER_S = 10.0
# A server persists the events it accepted in batches, at least every flush interval
# (PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL, Prefect's default 5 s): event queries see a
# beat only then. The bound is at least this many flushes (20 s at the default: a live run's newest
# beat is then at most ~10 s old), so a beat held back one flush never looks like a death.
FLUSHES_PER_BOUND = 4
# Gateway answers of a proxy in front of a restarting API: the API is unreachable, not refusing.
# And 500: while PostgreSQL restarts or fails over (60-120 s on a managed database) Prefect 3.9's
# APIs answer 500, not 503 (deployments/ha_stack/stack.py); the client's retries of it last ~62 s,
# after which the dispatcher waits the rest of its outage bound instead of failing the retrain
# while its child trains on, unwatched. A 500 that a bug repeats costs that bound, then fails.
UNREACHABLE_STATUS = frozenset({500, 502, 503, 504})
# What a server that does not say is taken to use: Prefect's own default (5 s).
DEFAULT_EVENT_FLUSH_S = float(ServerServicesEventPersisterSettings.model_fields["flush_interval"].default)
WORKER_BEATS_OF_SILENCE = 2
# The states in which a run's process is judged alive or lost (dispatch.wait_for). Before a worker
# takes the run (Scheduled, Late: queued behind the GPU slots, for hours at times) there is no process
# to judge, so nothing is probed or read but the run itself: at a 5 s poll, probing a queued run
# would store 720 events an hour that nobody reads.
JUDGED_STATES = frozenset({StateType.PENDING, StateType.RUNNING})
PULSES_PER_BOUND = 4
# Hosts whose clocks are off from the server's by more than this see their events missed.
SKEW_MARGIN = dt.timedelta(days=1)
HORIZON = dt.timedelta(days=366)


@dataclass(frozen=True)
class Evidence:
    """What the server says about the process under one flow run."""

    run_heartbeat: dt.datetime | None = None  # received: the run's latest heartbeat or pulse
    run_beats: int = 0  # how many heartbeats and pulses of the run the server holds
    run_pulses: bool = False  # the run is seen pulsing (PULSE_EVENT), not only heartbeating
    # The run was dispatched with pulse_seconds: its flow body pulses first thing, a moment after
    # Prefect's engine sends its first heartbeat (both through the process's one events connection),
    # so a run heard heartbeating but never pulsing died in that moment, or cannot send events.
    pulses_asked: bool = False
    worker: str | None = None  # the worker that took the run (its label)
    worker_heartbeat: dt.datetime | None = None  # that worker's last_heartbeat_time
    worker_interval_s: float | None = None  # how often that worker says it heartbeats
    worker_started: dt.datetime | None = None  # received: that worker's latest prefect.worker.started
    # received: the worker's prefect.worker.submitted-flow-run for this run. A worker process sends
    # its events in order on one connection, so its own started event always arrives before it;
    # a started event that arrives after it comes from a later process. (The run's Pending state
    # comes through another channel, the REST API, and may beat the worker's started event.)
    handed_over: dt.datetime | None = None
    probe_persisted: dt.datetime | None = None  # received: the newest persisted probe about this run (PROBE_EVENT)
    probes_persisted: int = 0  # how many probes about this run the server holds

    @property
    def run_heard(self) -> tuple[dt.datetime | None, int]:
        """What changes whenever a beat of the run is persisted, whatever its sender's clock."""
        return self.run_heartbeat, self.run_beats

    @property
    def probe_heard(self) -> tuple[dt.datetime | None, int]:
        """What changes whenever a probe is persisted, whatever this host's clock."""
        return self.probe_persisted, self.probes_persisted


class Silence:
    """How long a server-stamped value has stayed the same, on this host's monotonic clock: the
    value is only compared with itself, never with this host's wall clock."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Any, float]] = {}

    def of(self, source: str, value: Any, now: float) -> float:
        seen = self._seen.get(source)
        if seen is None or seen[0] != value:
            self._seen[source] = (value, now)
            return 0.0
        return now - seen[1]

    def forget(self) -> None:
        """After a time in which nothing could be seen (an API outage): count afresh."""
        self._seen.clear()


class Watch:
    """What one dispatcher has seen of one run's process, poll after poll, on this host's monotonic
    clock: how long each server-stamped value stayed the same, and whether the server went on
    persisting events meanwhile (the dispatcher's own probes, Evidence.probe_persisted)."""

    def __init__(self, watched: str, lost_after_s: float, poll_s: float,
                 logger: logging.Logger | logging.LoggerAdapter) -> None:
        self.watched = watched
        self.lost_after_s = lost_after_s
        # A healthy server makes a newer probe readable every poll, or every event flush where it
        # flushes less often (at most a quarter of the bound, lowest_lost_after_s): none for a whole
        # bound and a poll is a stalled persister, not a slow one.
        self.stalled_after_s = lost_after_s + poll_s
        self._silence = Silence()
        self._logger = logger
        self._stalled_since: float | None = None  # monotonic: the last time a newer probe was seen
        self._probe_when_stalled: tuple[dt.datetime | None, int] | None = None

    def forget(self) -> None:
        """After a time in which nothing could be seen (an API outage): count afresh."""
        self._silence.forget()

    def judge(self, evidence: Evidence, now: float) -> tuple[bool | None, str]:
        """Whether the run's process is alive, and why not (process_alive); now: this host's
        monotonic clock. The run's silence counts only up to the last time a newer probe became
        readable: a run that went quiet while nothing was persisted proves nothing."""
        if self._stalled_since is not None and evidence.probe_heard != self._probe_when_stalled:
            # What the run sent during the stall may never be persisted (Redis trims a stream past
            # a consumer idle too long, or loses it in a restart): its silence counts from now, as
            # after an API outage.
            self._logger.warning("events are persisted again after %.0fs: the silence of %s counts afresh",
                                 now - self._stalled_since, self.watched)
            self._stalled_since = None
            self._silence.forget()
        unpersisted_s = self._silence.of("probe", evidence.probe_heard, now)
        if self._stalled_since is None and unpersisted_s > self.stalled_after_s:
            self._stalled_since = now - unpersisted_s
            self._probe_when_stalled = evidence.probe_heard
            self._logger.warning(
                "the Prefect server has persisted none of this dispatcher's events for %.0fs: events are not "
                "being persisted (is the server's services process, `prefect server services start`, down?). "
                "%s is not called lost while its silence proves nothing; waiting for events to be persisted "
                "again, within the attempt's timeout", unpersisted_s, self.watched)
        run_silent_s = max(0.0, self._silence.of("run", evidence.run_heard, now) - unpersisted_s)
        # A worker's heartbeat is written by the API itself, not through events: its silence stands.
        return process_alive(evidence, run_silent_s, self._silence.of("worker", evidence.worker_heartbeat, now),
                             self.lost_after_s)


def process_alive(evidence: Evidence, run_silent_s: float, worker_silent_s: float,
                  lost_after_s: float) -> tuple[bool | None, str]:
    """Whether the run's process is alive (None: no worker has taken it yet), and why not.

    A run that heartbeats answers for itself, whatever became of its worker (a process that
    outlived its worker still finishes and reports). Before its first heartbeat, the worker that
    took it answers: silent, or started again after it took the run (a restart under the same
    name is a new process, and a new process never adopts its predecessor's runs). Silence is
    held to lost_after_s only where the beats come often enough for it (HEARTBEAT_ONLY_BOUND_S):
    a run that pulses or was asked to."""
    if evidence.run_heartbeat is not None:
        often = evidence.run_pulses or evidence.pulses_asked
        bound = lost_after_s if often else max(lost_after_s, HEARTBEAT_ONLY_BOUND_S)
        if run_silent_s > bound:
            return False, (f"flow run stopped heartbeating (none for {run_silent_s:.0f}s; "
                           f"worker {evidence.worker or 'unknown'})")
        return True, ""
    if evidence.worker is None or evidence.worker_heartbeat is None:
        return None, ""
    if (evidence.worker_started is not None and evidence.handed_over is not None
            and evidence.worker_started > evidence.handed_over):
        return False, (f"worker {evidence.worker} restarted after it took the run (started "
                       f"{evidence.worker_started:%H:%M:%S}, took the run {evidence.handed_over:%H:%M:%S} "
                       "server time): the process that ran it is gone")
    worker_bound = max(lost_after_s, WORKER_BEATS_OF_SILENCE * (evidence.worker_interval_s or 30.0))
    if worker_silent_s > worker_bound:
        return False, f"worker {evidence.worker} stopped heartbeating (none for {worker_silent_s:.0f}s)"
    return True, ""


def lowest_lost_after_s(event_flush_s: float) -> float:
    """The shortest lost-after bound that is safe against a server persisting events every event_flush_s."""
    return max(LOWEST_LOST_AFTER_S, FLUSHES_PER_BOUND * event_flush_s)


def lost_after_problem(lost_after_s: float, event_flush_s: float) -> str | None:
    """Why a dispatcher may not call a run lost after lost_after_s against this server (None: it may)."""
    lowest = lowest_lost_after_s(event_flush_s)
    if lost_after_s >= lowest:
        return None
    return (f"dispatch.lost_after_seconds is {lost_after_s:g}, below {lowest:g}, the shortest safe bound for a "
            f"Prefect server that persists events every {event_flush_s:g} s (its "
            "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL): live runs would be taken for dead; "
            f"use {lowest:g} or more")


def server_event_flush_s(client: SyncPrefectClient) -> float:
    """How often the server persists the events it accepts, as it says itself (GET /admin/settings);
    Prefect's default where it does not say (Prefect Cloud, an older or a locked-down API). An
    unreachable API raises, for the caller's outage handling."""
    import httpx

    try:
        response = client.request("GET", "/admin/settings")  # type: ignore[arg-type]
        response.raise_for_status()
        flush = float(response.json()["server"]["services"]["event_persister"]["flush_interval"])
    except httpx.HTTPStatusError as exc:
        # A gateway's answer is for the caller's outage handling; a 500 from this one endpoint (a
        # locked-down proxy, a bug) is an answer without the setting, as before 500 meant an outage.
        if exc.response.status_code in UNREACHABLE_STATUS - {500}:
            raise
        return DEFAULT_EVENT_FLUSH_S
    except (KeyError, TypeError, ValueError):  # an answer without the setting
        return DEFAULT_EVENT_FLUSH_S
    return flush if flush > 0 else DEFAULT_EVENT_FLUSH_S


def pulse_interval_s(lost_after_s: float) -> float:
    """How often a dispatched run pulses for a dispatcher that calls it lost after lost_after_s."""
    return max(1.0, lost_after_s / PULSES_PER_BOUND)


@contextmanager
def pulsing(interval_s: float | None) -> Iterator[None]:
    """While the block runs, send PULSE_EVENT about the current flow run every interval_s (None:
    nothing). From a thread of its own, so a long epoch does not delay it; a pulse that cannot be
    sent is a gap in the pulses, never an error of the run."""
    if not interval_s:
        yield
        return
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    resource = {"prefect.resource.id": f"prefect.flow-run.{flow_run.id}"}
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                emit_event(event=PULSE_EVENT, resource=resource)
            except Exception as exc:  # the dispatcher sees the gap; the run goes on
                logging.getLogger(__name__).warning("pulse not sent: %s: %s", type(exc).__name__, exc)
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=beat, name="protein-pulse", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def probe_resource(flow_run_id: Any) -> str:
    return f"protein.dispatch.{flow_run_id}"


def send_probe(client: SyncPrefectClient, flow_run_id: Any) -> None:
    """Send PROBE_EVENT about the dispatch of flow_run_id through the API (POST /events): it takes
    the path any client's event takes to the event store. An unreachable API raises, for the
    caller's outage handling; so does a refusal (an API that refuses events cannot be watched)."""
    from prefect.events import Event

    probe = Event(event=PROBE_EVENT, resource={"prefect.resource.id": probe_resource(flow_run_id)})
    client.request("POST", "/events", json=[probe.model_dump(mode="json")]).raise_for_status()


def observe(client: SyncPrefectClient, flow_run_id: Any, handed_over: dict[str, Any]) -> tuple[FlowRun, Evidence]:
    """The run and the evidence of its process; sends a probe (send_probe) to be read back at a
    later poll. handed_over: a cache the caller keeps per run (the worker's submission of it does
    not change once received). A run in no JUDGED_STATES gets no probe and empty evidence."""
    run = client.read_flow_run(flow_run_id)
    if (run.state.type if run.state else None) not in JUDGED_STATES:
        return run, Evidence()
    send_probe(client, run.id)
    window = (run.created - SKEW_MARGIN, run.created + HORIZON)  # created: stamped by the server
    # The probe before the beats: the persister writes events roughly in the order the APIs queued
    # them, so the beats sent before a readable probe are readable too (the run is not taken for
    # silent at the poll where a stalled persister catches up).
    probes = heard(client, probe_resource(run.id), [PROBE_EVENT], window)
    probe = {"probe_persisted": probes.newest.get(PROBE_EVENT), "probes_persisted": probes.count}
    worker = (run.labels or {}).get(WORKER_NAME_LABEL)
    beats = heard(client, f"prefect.flow-run.{run.id}", [HEARTBEAT_EVENT, PULSE_EVENT], window)
    if beats.newest or not worker or not run.work_pool_name:
        return run, Evidence(run_heartbeat=max(beats.newest.values(), default=None), run_beats=beats.count,
                             run_pulses=PULSE_EVENT in beats.newest,
                             pulses_asked=bool((run.parameters or {}).get("pulse_seconds")), worker=worker, **probe)
    # The API filters workers by heartbeat and status, not by name; a pool has few workers.
    found = next((w for w in client.read_workers_for_work_pool(run.work_pool_name) if w.name == worker), None)
    if found is None:
        return run, Evidence(worker=worker, **probe)
    from prefect.utilities.slugify import slugify

    resource = f"prefect.worker.{(run.labels or {}).get(WORKER_TYPE_LABEL, 'process')}.{slugify(worker)}"
    if "at" not in handed_over:
        at = latest_received(client, f"prefect.flow-run.{run.id}", "prefect.worker.submitted-flow-run", window,
                             related=True)
        if at is not None:
            handed_over["at"] = at
    started = None
    if "at" in handed_over:
        started = latest_received(client, resource, "prefect.worker.started",
                                  (handed_over["at"] - SKEW_MARGIN, handed_over["at"] + HORIZON))
    return run, Evidence(worker=worker, worker_heartbeat=found.last_heartbeat_time,
                         worker_interval_s=found.heartbeat_interval_seconds, worker_started=started,
                         handed_over=handed_over.get("at"), **probe)


def latest_received(client: SyncPrefectClient, resource_id: str, event: str,
                    occurred: tuple[dt.datetime, dt.datetime], related: bool = False) -> dt.datetime | None:
    """When the server received the newest `event` of `resource_id` (None: none yet); related:
    `resource_id` may be a related resource of the event rather than its subject."""
    return heard(client, resource_id, [event], occurred, related).newest.get(event)


@dataclass(frozen=True)
class Heard:
    """Events about one resource, as the server holds them."""

    # received: the newest of each name among the page of the newest by `occurred` (a name missing:
    # none of it lately). `occurred` is the sender's clock: a sender whose clock stepped back sends
    # events that sort below its older ones, and these times stop changing.
    newest: dict[str, dt.datetime]
    count: int  # all of them: one more with each event persisted, whatever its `occurred`


def heard(client: SyncPrefectClient, resource_id: str, events: list[str],
          occurred: tuple[dt.datetime, dt.datetime], related: bool = False) -> Heard:
    """The `events` about `resource_id` the server holds (related: `resource_id` may be a related
    resource of the event rather than its subject)."""
    from prefect.events.filters import (
        EventAnyResourceFilter,
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
        EventResourceFilter,
    )

    page = client.read_events(EventFilter(
        occurred=EventOccurredFilter(since=occurred[0], until=occurred[1]),
        event=EventNameFilter(name=events), order=EventOrder.DESC,
        **({"any_resource": EventAnyResourceFilter(id=[resource_id])} if related
           else {"resource": EventResourceFilter(id=[resource_id])})), limit=10)
    newest: dict[str, dt.datetime] = {}
    for event in page.events:
        if event.event not in newest or event.received > newest[event.event]:
            newest[event.event] = event.received
    return Heard(newest, page.total)
