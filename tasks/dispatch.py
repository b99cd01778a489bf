"""Run a step (training, scoring) as a deployment on the gpu pool and wait for it without hanging.

A run whose process dies (host lost, SIGKILL, OOM-killer, a worker restarted by systemd) stays
`Running` on the server forever: nothing marks it Crashed. So the parent watches the run's own
pulses and heartbeats (or, before the first, the worker that took it); when they stop, or the
attempt outlives its timeout, the run is marked Crashed/Cancelling and dispatched again with the
same run id: training resumes from the last epoch checkpoint in the store, scoring simply runs
again (it writes its result to the store under the run id; nothing of a lost attempt is kept).

Liveness is judged from server-stamped values only (when the server received a heartbeat and how
many it holds, when it recorded a worker's heartbeat or start), and "silent for how long" is
measured on this host's monotonic clock since such a value last changed: this host's wall clock is
never compared with the server's, nor are the beats taken in the order of their senders' clocks,
so clock skew or a clock stepped back cannot crash a healthy run. A worker restarted under the same name
is a new process: a `prefect.worker.started` the server received after it handed the run over
means the process that took the run is gone. A run's silence counts only while the server is
seen persisting events (the dispatcher's own probe events, tasks.liveness.Watch): with the
server's event persister down, every run would look silent and a healthy training would be
crashed and trained twice.

Attempts are keyed by the step, the run id, a digest of the deployment and parameters (what the
result depends on) and the attempt number (where retrying is the point). A dispatch, first or
after its parent was retried (Prefect retries, Retry in the UI), reads the attempts that exist:
it reuses one that Completed, waits on one still under way, and otherwise dispatches the next
attempt number, resuming the run. API calls ride out an outage of the Prefect API of up to
`api_outage_s` (backoff up to 30 s between tries), well past the client's own retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any, TypeVar

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.exceptions import MissingContextError
from prefect.states import Cancelling, Crashed

from tasks.liveness import (
    JUDGED_STATES,
    UNREACHABLE_STATUS,
    Watch,
    lost_after_problem,
    observe,
    pulse_interval_s,
    server_event_flush_s,
)

T = TypeVar("T")
# States after which an attempt will never produce a result (Cancelling: on its way to Cancelled).
DEAD = frozenset({StateType.FAILED, StateType.CANCELLED, StateType.CRASHED, StateType.CANCELLING})
MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class DispatchConfig:
    """How long and how often the parent waits for a step on another host."""

    timeout_s: float = 6 * 3600  # per attempt, from dispatch to a final state
    attempts: int = 3  # new attempts one execution of the parent may start
    poll_s: float = 5.0
    # Silence (of the run's pulses and heartbeats; of its worker before the run's first) after which
    # the run's process is taken for dead. The run is asked to pulse four times as often
    # (tasks.liveness); a run heard only through Prefect's 30 s heartbeats gets at least 45 s.
    lost_after_s: float = 120.0
    api_outage_s: float = 600.0  # how long an unreachable Prefect API is waited out
    # Before dispatching again after an attempt that was lost before it ever ran (its pull step's
    # clone failed, the worker could not start its process): doubled for each such attempt in a row.
    # What stops a run before it starts is mostly outside it (the git host, the worker's disk), and
    # dispatching again at once spent every attempt within a minute of a short outage. An attempt
    # lost while training is dispatched again at once: its resume waits for nothing.
    unstarted_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if (self.timeout_s <= 0 or self.attempts < 1 or self.poll_s <= 0 or self.lost_after_s <= 0
                or self.api_outage_s < 0 or not self.unstarted_backoff_s >= 0):
            raise ValueError(f"dispatch needs timeout_s, poll_s, lost_after_s > 0, attempts >= 1, "
                             f"api_outage_s, unstarted_backoff_s >= 0; got {self}")


class Step(Enum):
    WAIT = "wait"
    DONE = "done"
    FAILED = "failed"  # a real failure of training (bad data, a bug): dispatching again repeats it
    LOST = "lost"  # the process under a started run died: mark it Crashed, dispatch again
    TIMED_OUT = "timed out"  # started but not final within the timeout: cancel, dispatch again
    NEVER_STARTED = "never started"  # no worker picked it up: nothing to resume, say so


def decide(state: StateType | None, started: bool, worker_alive: bool | None, elapsed_s: float,
           timeout_s: float) -> Step:
    """What to do about one training attempt, from what the server says about it.

    started: the run reached Running at least once; worker_alive: whether the run's process is
    alive (tasks.liveness.process_alive), None when unknown (no worker has taken the run yet)."""
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


class Resume(Enum):
    REUSE = "reuse"  # an attempt Completed: its result stands
    ATTACH = "attach"  # an attempt is still under way (Scheduled, Pending, Running, ...): wait on it
    DISPATCH = "dispatch"  # none yet, or every one ended Failed/Cancelled/Crashed: start the next


def plan(attempts: Mapping[int, StateType | None], abandoned: Collection[int] = ()) -> tuple[Resume, int]:
    """What a dispatch does with the attempts that exist (attempt number -> state), and on which
    attempt number. abandoned: attempts this dispatch gave up on (marked Crashed or Cancelling),
    dead whatever the server still says."""
    done = [n for n, state in attempts.items() if state == StateType.COMPLETED]
    if done:
        return Resume.REUSE, max(done)
    live = [n for n, state in attempts.items() if state not in DEAD and n not in abandoned]
    if live:
        return Resume.ATTACH, max(live)
    return Resume.DISPATCH, max(attempts, default=0) + 1


def attempt_prefix(step: str, run_id: str, deployment: str, parameters: Mapping[str, Any]) -> str:
    """The part of an attempt's idempotency key that names what its result depends on."""
    digest = hashlib.sha256(json.dumps({"deployment": deployment, "parameters": parameters}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    return f"{step}-{run_id}-{digest}"


def idempotency_key(prefix: str, attempt: int) -> str:
    return f"{prefix}-attempt-{attempt}"


def api_unreachable(error: BaseException) -> bool:
    """The Prefect API could not be reached (after the client's own retries), as opposed to an
    answer that a retry would repeat."""
    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, httpx.HTTPStatusError) and error.response.status_code in UNREACHABLE_STATUS


def backoff_s(failures: int) -> float:
    """Wait before the next try after `failures` consecutive failed ones: 1, 2, 4 ... 30 s."""
    return min(2.0 ** (failures - 1), MAX_BACKOFF_S)


def through_outage(call: Callable[[], T], config: DispatchConfig, logger: logging.Logger | logging.LoggerAdapter,
                   what: str) -> tuple[T, bool]:
    """call() once the Prefect API answers, waiting out an outage of up to config.api_outage_s;
    also says whether there was one (whatever was being watched went unseen meanwhile)."""
    deadline = time.monotonic() + config.api_outage_s
    failures = 0
    while True:
        try:
            return call(), failures > 0
        except Exception as exc:
            if not api_unreachable(exc):
                raise
            failures += 1
            wait = backoff_s(failures)
            if time.monotonic() + wait > deadline:
                raise RuntimeError(f"the Prefect API stayed unreachable for over {config.api_outage_s:.0f}s while "
                                   f"{what}: {type(exc).__name__}: {exc}") from exc
            logger.warning("Prefect API unreachable while %s (%s: %s); trying again in %.0fs", what,
                           type(exc).__name__, exc, wait)
            time.sleep(wait)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a run (dispatch.fn in a test or a script)
        return logging.getLogger(__name__)


def existing_attempts(prefix: str) -> dict[int, FlowRun]:
    """The attempts created under this key prefix, by attempt number (they are numbered from 1
    without gaps: the next one is created only after the last one ended)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterIdempotencyKey

    found: dict[int, FlowRun] = {}
    window = 25
    with get_client(sync_client=True) as client:
        while True:
            numbers = range(len(found) + 1, len(found) + window + 1)
            keys = {idempotency_key(prefix, n): n for n in numbers}
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                idempotency_key=FlowRunFilterIdempotencyKey(any_=list(keys))), limit=window)
            found.update({keys[r.idempotency_key]: r for r in runs if r.idempotency_key in keys})
            if len(runs) < window:
                return found


@task(name="dispatch", task_run_name="dispatch-{step}", cache_policy=NO_CACHE)
def dispatch(step: str, deployment: str, parameters: dict[str, Any], run_id: str,
             config: DispatchConfig = DispatchConfig()) -> dict[str, Any]:
    """Run `deployment` with `parameters` until one attempt completes; the flow run ids of the
    attempts this call watched come back with the attempt number that completed. `step` ('train',
    'score-gate', 'score-predict') names the attempts' flow runs and keys. Raises RuntimeError when
    no attempt completed."""
    logger = run_logger()
    if problem := lost_after_refusal(config, logger):
        raise RuntimeError(problem)  # before anything is dispatched: a run judged by it would be crashed alive
    prefix = attempt_prefix(step, run_id, deployment, parameters)
    watched: list[str] = []
    abandoned: set[int] = set()
    dispatched = 0
    unstarted = 0  # attempts in a row lost before they ran
    while True:
        attempts, _ = through_outage(lambda: existing_attempts(prefix), config, logger, f"reading {step} attempts")
        action, number = plan({n: r.state_type for n, r in attempts.items()}, abandoned)
        if action is Resume.REUSE:
            logger.info("%s attempt %d (flow run %s) already completed: its result stands", step, number,
                        attempts[number].name)
            return {"flow_run_ids": [*watched, str(attempts[number].id)], "attempts": number}
        if action is Resume.DISPATCH:
            if dispatched == config.attempts:
                raise RuntimeError(f"{step} of run {run_id} did not complete in {config.attempts} attempts on "
                                   f"{deployment}")
            # The same key again after a lost answer: the server hands back the run it created. The
            # pulse is not in the key: how closely a run is watched does not change its result.
            pulsed = {**parameters, "pulse_seconds": pulse_interval_s(config.lost_after_s)}
            child, _ = through_outage(partial(run_deployment, deployment, parameters=pulsed, timeout=0,
                                              flow_run_name=f"{step}-{run_id}",
                                              idempotency_key=idempotency_key(prefix, number)),
                                      config, logger, f"dispatching {step}")
            dispatched += 1
            logger.info("%s attempt %d (%d/%d here): flow run %s on %s", step, number, dispatched, config.attempts,
                        child.name, deployment)
        else:
            child = attempts[number]
            logger.info("%s attempt %d (flow run %s) is %s: waiting on it", step, number, child.name,
                        child.state_name)
        watched.append(str(child.id))
        outcome, state, started = wait_for(child.id, config, logger)
        if outcome is Step.DONE:
            return {"flow_run_ids": watched, "attempts": number}
        if outcome in (Step.FAILED, Step.NEVER_STARTED):
            raise RuntimeError(f"{step} {child.name} ({deployment}) {outcome.value}: {state}")
        abandoned.add(number)
        unstarted = 0 if started else unstarted + 1
        delay = unstarted_delay_s(config, unstarted) if dispatched < config.attempts else 0.0
        logger.warning("%s attempt %d %s (%s); dispatching run %s again%s", step, number, outcome.value, state, run_id,
                       f" in {delay:.0f}s (it never ran)" if delay else "")
        time.sleep(delay)


def lost_after_refusal(config: DispatchConfig,
                       logger: logging.Logger | logging.LoggerAdapter | None = None) -> str | None:
    """Why config's lost-after bound is unsafe against this Prefect server (None: it is safe): the
    server is asked how often it persists events."""
    with get_client(sync_client=True) as client:
        event_flush_s, _ = through_outage(partial(server_event_flush_s, client), config, logger or run_logger(),
                                          "reading how often the server persists events")
    return lost_after_problem(config.lost_after_s, event_flush_s)


def ever_ran(run: FlowRun) -> bool:
    """Whether the run went Running, also between two polls: its run count (a Running state counts
    one). Not its start_time: Prefect fills that in when a run ends, also for one that never ran."""
    return (run.state.type if run.state else None) == StateType.RUNNING or (run.run_count or 0) > 0


def unstarted_delay_s(config: DispatchConfig, unstarted: int) -> float:
    """The wait before the next attempt after `unstarted` attempts in a row lost before they ran."""
    return config.unstarted_backoff_s * 2 ** (unstarted - 1) if unstarted > 0 else 0.0


def wait_for(flow_run_id: Any, config: DispatchConfig,
             logger: logging.Logger | logging.LoggerAdapter | None = None) -> tuple[Step, str, bool]:
    """Watch one attempt until it is done or given up on: the step, what its state said, and
    whether it ever reached Running."""
    logger = logger or run_logger()
    start = time.monotonic()
    started = False
    watch = Watch(f"flow run {flow_run_id}", config.lost_after_s, config.poll_s, logger)
    handed_over: dict[str, Any] = {}  # when the server saw the run handed to a worker, once known
    with get_client(sync_client=True) as client:
        while True:
            (run, evidence), outage = through_outage(lambda: observe(client, flow_run_id, handed_over), config,
                                                     logger, f"watching flow run {flow_run_id}")
            if outage:
                watch.forget()  # nothing was seen during the outage: silence counts from now
            state = run.state.type if run.state else None
            started = started or ever_ran(run)
            alive, why = watch.judge(evidence, time.monotonic()) if state in JUDGED_STATES else (None, "")
            step = decide(state, started, alive, time.monotonic() - start, config.timeout_s)
            described = f"{run.state.name if run.state else 'no state'}: {run.state.message if run.state else ''}"
            if step is Step.LOST and state != StateType.CRASHED:
                # Nobody else will: the process that would report the end of this run is gone.
                through_outage(partial(client.set_flow_run_state, flow_run_id, Crashed(message=why), force=True),
                               config, logger, f"marking flow run {flow_run_id} Crashed")
                through_outage(partial(crash_unfinished_task_runs, client, flow_run_id, why), config, logger,
                               f"marking the unfinished task runs of flow run {flow_run_id} Crashed")
                described = why
            elif step in (Step.TIMED_OUT, Step.NEVER_STARTED):
                # A live worker kills the process of a Cancelling run; a dead one leaves it, harmlessly.
                message = f"not final after {config.timeout_s:.0f}s"
                through_outage(partial(client.set_flow_run_state, flow_run_id, Cancelling(message=message),
                                       force=True), config, logger, f"cancelling flow run {flow_run_id}")
                described = f"{message} (was {described})"
            if step is not Step.WAIT:
                return step, described, started
            time.sleep(config.poll_s)


def crash_unfinished_task_runs(client: Any, flow_run_id: Any, why: str) -> int:
    """The task runs a lost flow run's process left Pending or Running (it died mid-task) are marked
    Crashed with it: their process will never report their end, and Prefect's server cleans up the
    task runs of Cancelled flow runs only, so the UI would show a dead host's training as running for
    ever. Returns how many were marked."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )

    unfinished = client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(
            any_=[StateType.PENDING, StateType.RUNNING]))))
    for task_run in unfinished:
        client.set_task_run_state(task_run.id, Crashed(message=f"its flow run was lost: {why}"), force=True)
    return len(unfinished)
