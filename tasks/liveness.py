"""Is the process under a dispatched flow run alive? Judged from what the Prefect server stamped.

Every time here is one the server wrote: when it received an event (`received`) or recorded a
worker's heartbeat. Event filters need an `occurred` window, and `occurred` is stamped by the
emitting host, so the window is a wide one around the run's server-stamped creation, never "now"
on this host (Prefect's default `until` is this host's clock: a CPU host running behind would
not see the newest heartbeats).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun

WORKER_NAME_LABEL = "prefect.worker.name"
WORKER_TYPE_LABEL = "prefect.worker.type"
# Hosts whose clocks are off from the server's by more than this see their events missed.
SKEW_MARGIN = dt.timedelta(days=1)
HORIZON = dt.timedelta(days=366)


@dataclass(frozen=True)
class Evidence:
    """What the server says about the process under one flow run."""

    run_heartbeat: dt.datetime | None = None  # received: the run's latest prefect.flow-run.heartbeat
    worker: str | None = None  # the worker that took the run (its label)
    worker_heartbeat: dt.datetime | None = None  # that worker's last_heartbeat_time
    worker_started: dt.datetime | None = None  # received: that worker's latest prefect.worker.started
    # received: the worker's prefect.worker.submitted-flow-run for this run. A worker process sends
    # its events in order on one connection, so its own started event always arrives before it;
    # a started event that arrives after it comes from a later process. (The run's Pending state
    # comes through another channel, the REST API, and may beat the worker's started event.)
    handed_over: dt.datetime | None = None


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


def process_alive(evidence: Evidence, run_silent_s: float, worker_silent_s: float,
                  lost_after_s: float) -> tuple[bool | None, str]:
    """Whether the run's process is alive (None: no worker has taken it yet), and why not.

    A run that heartbeats answers for itself, whatever became of its worker (a process that
    outlived its worker still finishes and reports). Before its first heartbeat, the worker that
    took it answers: silent, or started again after it took the run (a restart under the same
    name is a new process, and a new process never adopts its predecessor's runs)."""
    if evidence.run_heartbeat is not None:
        if run_silent_s > lost_after_s:
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
    if worker_silent_s > lost_after_s:
        return False, f"worker {evidence.worker} stopped heartbeating (none for {worker_silent_s:.0f}s)"
    return True, ""


def observe(client: SyncPrefectClient, flow_run_id: Any, handed_over: dict[str, Any]) -> tuple[FlowRun, Evidence]:
    """The run and the evidence of its process. handed_over: a cache the caller keeps per run
    (the worker's submission of it does not change once received)."""
    run = client.read_flow_run(flow_run_id)
    window = (run.created - SKEW_MARGIN, run.created + HORIZON)  # created: stamped by the server
    worker = (run.labels or {}).get(WORKER_NAME_LABEL)
    beat = latest_received(client, f"prefect.flow-run.{run.id}", "prefect.flow-run.heartbeat", window)
    if beat is not None or not worker or not run.work_pool_name:
        return run, Evidence(run_heartbeat=beat, worker=worker)
    # The API filters workers by heartbeat and status, not by name; a pool has few workers.
    found = next((w for w in client.read_workers_for_work_pool(run.work_pool_name) if w.name == worker), None)
    if found is None:
        return run, Evidence(worker=worker)
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
    return run, Evidence(worker=worker, worker_heartbeat=found.last_heartbeat_time, worker_started=started,
                         handed_over=handed_over.get("at"))


def latest_received(client: SyncPrefectClient, resource_id: str, event: str,
                    occurred: tuple[dt.datetime, dt.datetime], related: bool = False) -> dt.datetime | None:
    """When the server received the newest `event` of `resource_id` (None: none yet); related:
    `resource_id` may be a related resource of the event rather than its subject."""
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
        event=EventNameFilter(name=[event]), order=EventOrder.DESC,
        **({"any_resource": EventAnyResourceFilter(id=[resource_id])} if related
           else {"resource": EventResourceFilter(id=[resource_id])})), limit=5)
    return max((e.received for e in page.events), default=None)
