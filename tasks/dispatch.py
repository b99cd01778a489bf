"""Run a step (training, scoring) as a deployment on the gpu pool and wait for it without hanging.

A run whose worker dies (host lost, SIGKILL, OOM-killer) stays `Running` on the
server forever: nothing marks it Crashed. So the parent watches the worker that took the run;
when that worker stops heartbeating, or the attempt outlives its timeout, the run is marked
Crashed/Cancelling and dispatched again with the same run id: training resumes from the last
epoch checkpoint in the store, scoring simply runs again (it writes its result to the store
under the run id; nothing of a lost attempt is kept). Every attempt carries an idempotency key
derived from the step and the run id, so a retried parent finds the attempts it already
started instead of starting new ones.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.states import Cancelling, Crashed

WORKER_NAME_LABEL = "prefect.worker.name"
# Prefect's own foreman calls a worker offline after this many missed heartbeats.
MISSED_HEARTBEATS = 3


@dataclass(frozen=True)
class DispatchConfig:
    """How long and how often the parent waits for a step on another host."""

    timeout_s: float = 6 * 3600  # per attempt, from dispatch to a final state
    attempts: int = 3
    poll_s: float = 5.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.attempts < 1 or self.poll_s <= 0:
            raise ValueError(f"dispatch needs timeout_s > 0, attempts >= 1, poll_s > 0; got {self}")


class Step(Enum):
    WAIT = "wait"
    DONE = "done"
    FAILED = "failed"  # a real failure of training (bad data, a bug): dispatching again repeats it
    LOST = "lost"  # the worker died under a started run: mark it Crashed, dispatch again
    TIMED_OUT = "timed out"  # started but not final within the timeout: cancel, dispatch again
    NEVER_STARTED = "never started"  # no worker picked it up: nothing to resume, say so


def decide(state: StateType | None, started: bool, worker_alive: bool | None, elapsed_s: float,
           timeout_s: float) -> Step:
    """What to do about one training attempt, from what the server says about it.

    started: the run reached Running at least once; worker_alive: None when unknown (no worker
    has taken the run yet)."""
    if state == StateType.COMPLETED:
        return Step.DONE
    if state == StateType.CRASHED:
        return Step.LOST
    if state in (StateType.FAILED, StateType.CANCELLED, StateType.CANCELLING):
        return Step.FAILED
    if worker_alive is False and state in (StateType.PENDING, StateType.RUNNING):
        return Step.LOST
    if elapsed_s > timeout_s:
        return Step.TIMED_OUT if started else Step.NEVER_STARTED
    return Step.WAIT


def idempotency_key(run_id: str, attempt: int, step: str = "train") -> str:
    return f"{step}-{run_id}-attempt-{attempt}"


def worker_alive(client: SyncPrefectClient, run: FlowRun, now: dt.datetime) -> bool | None:
    """Whether the worker that took `run` still heartbeats; None before a worker took it."""
    name = (run.labels or {}).get(WORKER_NAME_LABEL)
    if not name or not run.work_pool_name:
        return None
    # The API filters workers by heartbeat and status, not by name; a pool has few workers.
    worker = next((w for w in client.read_workers_for_work_pool(run.work_pool_name) if w.name == name), None)
    if worker is None or worker.last_heartbeat_time is None:
        return None
    silence = (now - worker.last_heartbeat_time).total_seconds()
    return silence <= MISSED_HEARTBEATS * (worker.heartbeat_interval_seconds or 30)


@task(name="dispatch", task_run_name="dispatch-{step}", cache_policy=NO_CACHE)
def dispatch(step: str, deployment: str, parameters: dict[str, Any], run_id: str,
             config: DispatchConfig = DispatchConfig()) -> dict[str, Any]:
    """Run `deployment` with `parameters` until one attempt completes; the flow run ids of all
    attempts come back with the outcome. `step` ('train', 'score-gate', 'score-predict') names
    the attempts' flow runs and keys. Raises RuntimeError when no attempt completed."""
    logger = get_run_logger()
    runs: list[str] = []
    for attempt in range(1, config.attempts + 1):
        child = run_deployment(deployment, parameters=parameters, timeout=0, flow_run_name=f"{step}-{run_id}",
                               idempotency_key=idempotency_key(run_id, attempt, step))
        runs.append(str(child.id))
        logger.info("%s attempt %d/%d: flow run %s on %s", step, attempt, config.attempts, child.name, deployment)
        outcome, state = wait_for(child.id, config)
        if outcome is Step.DONE:
            return {"flow_run_ids": runs, "attempts": attempt}
        if outcome in (Step.FAILED, Step.NEVER_STARTED):
            raise RuntimeError(f"{step} {child.name} ({deployment}) {outcome.value}: {state}")
        logger.warning("%s attempt %d %s (%s); dispatching run %s again", step, attempt, outcome.value, state, run_id)
    raise RuntimeError(f"{step} of run {run_id} did not complete in {config.attempts} attempts on {deployment}")


def wait_for(flow_run_id: Any, config: DispatchConfig) -> tuple[Step, str]:
    start = time.monotonic()
    started = False
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            state = run.state.type if run.state else None
            started = started or state == StateType.RUNNING
            alive = worker_alive(client, run, dt.datetime.now(dt.UTC)) if state in (
                StateType.PENDING, StateType.RUNNING) else None
            step = decide(state, started, alive, time.monotonic() - start, config.timeout_s)
            described = f"{run.state.name if run.state else 'no state'}: {run.state.message if run.state else ''}"
            if step is Step.LOST and state != StateType.CRASHED:
                # Nobody else will: the process that would report the end of this run is gone.
                client.set_flow_run_state(flow_run_id, Crashed(
                    message=f"worker {run.labels.get(WORKER_NAME_LABEL)} stopped heartbeating"), force=True)
                described = f"worker {run.labels.get(WORKER_NAME_LABEL)} stopped heartbeating"
            elif step in (Step.TIMED_OUT, Step.NEVER_STARTED):
                # A live worker kills the process of a Cancelling run; a dead one leaves it, harmlessly.
                client.set_flow_run_state(flow_run_id, Cancelling(
                    message=f"not final after {config.timeout_s:.0f}s"), force=True)
                described = f"not final after {config.timeout_s:.0f}s (was {described})"
            if step is not Step.WAIT:
                return step, described
            time.sleep(config.poll_s)
