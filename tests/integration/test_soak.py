"""A month of operation, compressed, with nothing lost (issue #21's "done when").

The production shape of prefect_stack.py (the highly available Prefect server on PostgreSQL, a
CPU-host worker, the deploy wrapper's deployments and automations, the webhook on a local
receiver) plus two GPU-host workers, with every host reaching S3 (moto) through a FaultProxy the
test can take down. A seeded calendar of PROTEIN_SOAK_NIGHTS nights (default 30): each night one
run of retrain/nightly created as the scheduler creates it (Scheduled, the schedule's
parameters), and 8 `protein datasets push`es on random nights, some while the previous push's
retrain runs, one of data pushed before, one of invalid data. Faults on the way: a GPU worker
SIGKILLed mid-training twice, a GPU worker restarted under its own name mid-training, S3 down
for longer than the client's retries, one API process of the HA server killed and replaced.

At the end, from the store and the API alone: every push trained, superseded by a newer trained
push, or refused by validation with an alert; the champion trained on the newest valid push; no
nightly trained data the champion already had; no run Pending or Running; one version per
training run id; every failed, crashed or push-cancelled run alerted exactly once; no project
file left in any host's temp folder and caches within their bound. One tally line and the seed
are printed (SOAK_SEED=... reproduces a calendar).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from deployments.ha_stack import Postgres
from protein.registry.records import flow_training_run_id
from tasks.liveness import LOWEST_LOST_AFTER_S, WORKER_NAME_LABEL
from tests.helpers import REPO, write_dataset, write_png
from tests.integration.fault_proxy import FaultProxy
from tests.integration.prefect_services import Service, host_env, stop_all, worker_args
from tests.integration.prefect_stack import Stack, start_stack, stop_stack
from tests.integration.soak_calendar import FAULTS, Plan, Push, make_plan
from tests.integration.test_ha_failover import left_unfinished, train_runs
from tests.integration.test_multihost import task_runs
from tests.integration.test_push_queue import resolved

# A month in `make test` (6 minutes alone on this 2-core machine, mostly waiting: it runs on one
# xdist worker beside the rest of the suite, started first); `make soak` runs 90 nights.
NIGHTS = int(os.environ.get("PROTEIN_SOAK_NIGHTS", "30"))
pytestmark = [pytest.mark.integration, pytest.mark.long_running, pytest.mark.timeout(900 + 90 * max(NIGHTS, 1))]
SEED = int(os.environ.get("SOAK_SEED", "21"))
# S3 down this long: longer than a client's own retries (3 attempts, 2 s connect timeout, a few
# seconds in all: protein/storage/s3.py), so the first two tries of the run's first store task fail,
# and shorter than the tasks' retries (2 + 10 + 30 s), so the run rides it out on its third. The
# issue's 60 s, shortened to the compressed clock (20 s rode it out on the fourth try, 30 s later).
S3_OUTAGE_S = 10.0
# The lowest bound accepted, safe against the stack's servers, which persist events every second:
# dispatched runs pulse every 2.5 s for it.
LOST_AFTER_S = LOWEST_LOST_AFTER_S
PATTERN = ["0", "4", "6 4", "2 5"]  # the stack's labels: new data never drifts from the champion's
TEST_IDS = ["900", "901", "902"]
# Git's gate for scheduled and triggered runs: promote every trained challenger, so "the champion
# is trained on the newest valid push" is a property of the loop, not of tiny random models.
SOAK_GATE = {"min_score": 0.0, "min_gain": -1.0, "max_class_drop": 1.0, "min_rows": 1}
# In a host's temp folder: torch's own compile cache (not the project's), and the working directory
# Prefect's process worker makes for each flow run (the pull step's clone inside), removed when the
# run ends: tempfile's tmp<random>prefect.
TORCH_TEMP = "torchinductor_"
FINAL_WAIT_S = 900.0
ALERT_WAIT_S = 90.0
DUPLICATE_ALERT_WINDOW_S = 5.0  # a second alert about one failure comes within this of the first
WORKSPACE_REMOVAL_WAIT_S = 30.0
# The workers ask for runs twice a second (the other stacks' once): each of the ~50 runs of a month
# waits for its worker a quarter of a second on average, instead of half a second.
WORKER_QUERY_S = 0.5


def run_workspace(path: Path) -> bool:
    return path.name.startswith("tmp") and path.name.endswith("prefect")


@dataclass
class GpuHost:
    name: str
    root: Path
    service: Service


@dataclass
class Soak:
    stack: Stack
    proxy: FaultProxy
    tmp: Path
    services: list[Service]  # the `services` fixture's list: GPU workers, stopped at the end
    gpu: list[GpuHost] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # applied, with where
    # roots of the hosts whose processes the soak SIGKILLed: when (wall clock, as files are stamped)
    killed: dict[Path, float] = field(default_factory=dict)
    debris: list[Path] = field(default_factory=list)  # left in the temp folders of killed hosts
    quiet_nights_s: list[float] = field(default_factory=list)  # creation to end of each night without push or fault
    nights_s: list[tuple[float, str]] = field(default_factory=list)  # each night's duration and what it held
    outage_run: Any = None  # the run S3 went down under
    # (fault, the retrain it struck, that retrain's training run then Running): each must recover.
    struck: list[tuple[str, Any, Any]] = field(default_factory=list)
    # The killed API's replacement, started in the background as systemd restarts a unit: the
    # pushes meant to arrive during the retrain go on meanwhile. Joined at the end of the night.
    api_restart: threading.Thread | None = None
    api_restart_error: list[BaseException] = field(default_factory=list)

    def restart_killed_api_later(self, after_s: float) -> None:
        def restart() -> None:
            try:
                time.sleep(after_s)
                self.stack.ha.replace_killed_apis()
            except BaseException as exc:  # re-raised in the test's thread by api_restarted()
                self.api_restart_error.append(exc)

        self.api_restart = threading.Thread(target=restart, name="api-restart", daemon=True)
        self.api_restart.start()

    def join_api_restart(self) -> bool:
        """Waits for the replacement, if one is starting; False if it is still starting after 120 s."""
        if self.api_restart is not None:
            self.api_restart.join(timeout=120)
            if self.api_restart.is_alive():
                return False
            self.api_restart = None
        return True

    def api_restarted(self) -> None:
        assert self.join_api_restart(), "the killed API's replacement did not start in 120 s"
        if self.api_restart_error:
            raise self.api_restart_error.pop()

    def start_gpu_host(self, name: str, root: Path) -> GpuHost:
        env = host_env(self.stack.env, root, {"PROTEIN_ALLOW_CPU": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
                                              "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_S)})
        service = Service(f"worker-{name}-{len(self.services)}", worker_args("gpu", name), env, self.tmp, cwd=root)
        self.services.append(service)
        host = GpuHost(name, root.resolve(), service)
        self.gpu.append(host)
        return host

    def host_roots(self) -> list[Path]:
        return [self.tmp / "cpu-host", *sorted({s.cwd.resolve() for s in self.services})]


@pytest.fixture
def soak(ha_postgres: Postgres, services: list[Service], tmp_path: Path) -> Iterator[Soak]:
    from prefect.client.schemas.actions import DeploymentUpdate

    from tests.conftest import running_moto_server

    with running_moto_server() as s3:
        proxy = FaultProxy(s3.endpoint)
        proxy.start()
        stack = start_stack(tmp_path, proxy, ha_postgres, gate=SOAK_GATE, worker_query_s=WORKER_QUERY_S)
        soak: Soak | None = None
        try:
            with stack.client() as client:
                nightly = client.read_deployment_by_name("retrain/nightly")
                client.update_deployment(nightly.id, DeploymentUpdate(parameters={
                    **nightly.parameters, "train_deployment": "train/gpu", "gate_config": SOAK_GATE,
                    "dispatch": {"timeout_minutes": 10, "attempts": 3, "poll_seconds": 0.5,
                                 "lost_after_seconds": LOST_AFTER_S}}))
            soak = Soak(stack, proxy, tmp_path, services)
            for name in ("gpu-a", "gpu-b"):
                soak.start_gpu_host(name, tmp_path / name)
            yield soak
        finally:
            if soak is not None:  # the stack stops after the restart
                soak.join_api_restart()
            proxy.start() if proxy.down else None  # stop_stack's S3 reads need it up
            # Every host's worker at once, before the server they talk to: after a month each
            # lingers through the 3 s grace of its first SIGTERM (an idle one alone exits in 0.5 s),
            # and the GPU hosts' were stopped after the server, by the `services` fixture.
            stop_all([*services, *stack.services])
            stop_stack(stack)
            proxy.stop()


def push(soak: Soak, push_: Push, previous: Path | None) -> tuple[dict[str, Any], Path]:
    """`protein datasets push` of this push's data, as a user runs it; the data's folder too."""
    folder = previous if push_.kind == "same" and previous is not None else soak.tmp / f"data-{push_.index}"
    if folder != previous:
        labels = {str(push_.index * 100 + i): PATTERN[i % 4] for i in range(24)}
        write_dataset(folder, labels, TEST_IDS, size=40, seed=push_.index)
        if push_.kind == "invalid":  # one grayscale image: the images suite refuses it
            write_png(folder / "train" / f"{push_.index * 100 + 5}.png", 40, seed=5, mode="L")
    pushed = subprocess.run([sys.executable, "-m", "protein.cli", "datasets", "push", "--data", str(folder),
                             "--store", soak.stack.store], env=soak.stack.env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert pushed.returncode == 0, f"push {push_.index} failed: {pushed.stdout}{pushed.stderr}"
    return json.loads(pushed.stdout), folder


def run_of(soak: Soak, pushed: dict[str, Any]) -> Any:
    return soak.stack.wait_run("retrain/nightly", lambda r: r.parameters.get("trigger_event")
                               == f"protein.dataset.pushed {pushed['event_id']}", f"for push #{pushed['sequence']}")


def schedule_nightly(soak: Soak, night: int) -> Any:
    """A nightly run as the scheduler creates one: Scheduled for its time, the schedule's parameters,
    its idempotency key and tag. The calendar is compressed: night n is due now. Only the server's
    `auto_scheduled` flag differs (the scheduler alone sets it), so these runs take the gate of the
    API's parameters, which the fixture sets to the definition's, SOAK_GATE."""
    from prefect.states import Scheduled

    with soak.stack.client() as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
        [schedule] = nightly.schedules
        day = dt.datetime(2027, 1, 1, 2, tzinfo=dt.UTC) + dt.timedelta(days=night)
        return client.create_flow_run_from_deployment(
            nightly.id, parameters=dict(schedule.parameters), tags=["auto-scheduled"],
            idempotency_key=f"scheduled {nightly.id} {schedule.id} {day.isoformat()}",
            state=Scheduled(scheduled_time=dt.datetime.now(dt.UTC)))


def wait_until(soak: Soak, what: str, check: Any, timeout_s: float = 600.0, poll_s: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s\n{soak.stack.logs()}"
        time.sleep(poll_s)
    return found


def wait_resolved_and_running(soak: Soak, run: Any) -> None:
    """The run took its push (resolved the channel) and still runs: a push now arrives during it."""
    with soak.stack.client() as client:
        wait_until(soak, f"{run.name} resolving its data", lambda: resolved(client, run.id)
                   or client.read_flow_run(run.id).state.is_final())
        assert not client.read_flow_run(run.id).state.is_final(), "inconclusive: the retrain ended before the push"


def apply_fault(soak: Soak, fault: str, run: Any) -> None:
    """Once the retrain's training run is Running on a GPU host: the fault, there and then."""
    with soak.stack.client() as client:
        train = wait_until(soak, f"training of {run.name}", lambda: next(
            (t for t in train_runs(soak.stack, run.id) if t.state_type.value == "RUNNING"), None)
            or (client.read_flow_run(run.id).state.is_final() and "ended"), poll_s=0.2)
    if train == "ended":
        with soak.stack.client() as client:
            state = client.read_flow_run(run.id).state
        raise AssertionError(f"inconclusive: {run.name} ended {state.name} ({state.message}) before it trained\n"
                             f"{soak.stack.logs()}")
    soak.struck.append((fault, run.id, train))
    if fault == "api-restart":
        killed = soak.stack.ha.kill_api(0)
        soak.restart_killed_api_later(after_s=2.0)
        soak.faults.append(f"api {killed.name} killed and replaced while {train.name} trained")
        return
    [host] = [h for h in soak.gpu if h.name == train.labels.get(WORKER_NAME_LABEL) and h.service.alive()]
    host.service.kill(host.root)  # the worker and the flow-run processes of that host, at once
    soak.killed[host.root] = time.time()
    soak.gpu.remove(host)
    if fault == "restart":  # systemd brings the unit back: a new process, the same name and host
        soak.start_gpu_host(host.name, host.root)
    else:  # the lost host's replacement: a new worker of a new name in a fresh directory
        soak.start_gpu_host(f"gpu-{len(soak.services)}", soak.tmp / f"gpu-{len(soak.services)}")
    soak.faults.append(f"{fault} of {host.name} while it ran {train.name}")


def s3_outage(soak: Soak, run: Any) -> None:
    """S3 goes down as the nightly is created, before its process can start, and stays down S3_OUTAGE_S
    once the run is Running, so its first store task meets the outage however long the host takes to
    start the run. Taken down once the run had left Scheduled, it missed a run whose process was slow
    to start under load: the outage ended before any store read and no task retried."""
    soak.proxy.stop()
    with soak.stack.client() as client:
        wait_until(soak, f"{run.name} running", lambda: client.read_flow_run(run.id).state_type.value
                   not in ("SCHEDULED", "PENDING"))
    time.sleep(S3_OUTAGE_S)
    soak.proxy.start()
    soak.faults.append(f"S3 down {S3_OUTAGE_S:.0f}s during {run.name}")
    soak.outage_run = run


def live_calendar(soak: Soak, plan: Plan, pushes: dict[int, dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """Play the calendar; returns the nightly runs and the push runs, all final. ``pushes``: each
    push's answer (sequence, event id, fingerprint) by its index, filled as they happen."""
    nightlies: list[Any] = []
    push_runs: list[Any] = []
    folder: Path | None = None
    for night in range(plan.nights):
        night_started = time.monotonic()
        started: list[Any] = []
        for push_ in (p for p in plan.pushes if p.night == night):
            if push_.during:  # while the night's first retrain runs, having taken its push
                wait_resolved_and_running(soak, started[0])
            pushed, folder = push(soak, push_, folder)
            pushes[push_.index] = pushed
            if push_.during and not push_.fault:
                # Its run is looked up once the night's pushes are made: the next push arrives
                # while the first retrain still runs, not after the trigger's round trip.
                started.append(pushed)
                continue
            started.append(run_of(soak, pushed))
            if push_.fault:
                apply_fault(soak, push_.fault, started[-1])
        started = [run_of(soak, s) if isinstance(s, dict) else s for s in started]
        scheduled = time.monotonic()
        nightly = schedule_nightly(soak, night)
        if night == plan.s3_outage_night:
            s3_outage(soak, nightly)
        started.append(nightly)
        for run in started:
            soak.stack.wait_final(run.id, FINAL_WAIT_S)
        soak.api_restarted()
        if len(started) == 1 and night != plan.s3_outage_night:
            soak.quiet_nights_s.append(time.monotonic() - scheduled)
        held = [f"push {p.describe()}" for p in plan.pushes if p.night == night] \
            + (["S3 down"] if night == plan.s3_outage_night else [])
        soak.nights_s.append((time.monotonic() - night_started, f"night {night}: {', '.join(held) or 'quiet'}"))
        push_runs += started[:-1]
        nightlies.append(nightly)
    return nightlies, push_runs


def changed_at(path: Path) -> float:
    """A path's mtime; -inf once it is gone (removed while we looked)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return -math.inf


def disk_bytes(paths: list[Path]) -> int:
    return sum(f.lstat().st_size for root in paths if root.exists() for f in [root, *root.rglob("*")]
               if f.is_file() and not f.is_symlink())


def all_flow_runs(soak: Soak) -> list[Any]:
    runs: list[Any] = []
    with soak.stack.client() as client:
        while page := client.read_flow_runs(limit=200, offset=len(runs)):
            runs += page
    return runs


def alerts_about(soak: Soak, run_id: Any) -> int:
    return sum(1 for m in list(soak.stack.receiver.messages) if str(run_id) in m.get("text", ""))


def audit(soak: Soak, pushes: dict[int, dict[str, Any]], plan: Plan) -> tuple[list[str], int]:
    """Every invariant of the month, read from the store and the API alone; (violations, versions).
    A check that raises is a violation naming it: the other checks still run."""
    from protein.cache_budget import max_cache_bytes
    from protein.data.channels import read_channel
    from protein.errors import NotFound
    from protein.registry import Registry
    from protein.storage import open_store

    store = open_store(soak.stack.store)
    registry = Registry(store)
    specs = registry.specs(registry.versions())
    good = {v: s for v, s in specs.items() if not isinstance(s, Exception)}
    trained = {s["data_fingerprint"] for s in good.values()}
    runs = all_flow_runs(soak)
    retrains = {str(r.id): r for r in runs if r.parameters.get("data") == "channel:latest"}
    history = read_channel(store, "latest").history
    state = registry.champion()

    def refused_with_one_alert(event_id: str) -> bool:
        return any((r.parameters.get("trigger_event") or "").endswith(event_id) and r.state.is_failed()
                   and (r.state.message or "").startswith("data failed validation") and alerts_about(soak, r.id) == 1
                   for r in retrains.values())

    def valid(fingerprint: str) -> bool:
        try:
            return json.loads(store.get_bytes(f"validation/{fingerprint}/report.json"))["success"] is True
        except NotFound:
            return False

    def pushes_accounted() -> Iterator[str]:
        yield from (f"version {v} unreadable: {s}" for v, s in specs.items() if isinstance(s, Exception))
        for entry in history:
            newer_trained = any(e.sequence > entry.sequence and e.fingerprint in trained for e in history)
            if not (entry.fingerprint in trained or newer_trained or refused_with_one_alert(entry.event_id)):
                yield (f"push #{entry.sequence} ({entry.fingerprint[:12]}) lost: not trained, not superseded by a "
                       "trained push, not refused with an alert")
        for push_ in (p for p in plan.pushes if p.kind == "invalid"):
            if not refused_with_one_alert(pushes[push_.index]["event_id"]):
                yield f"the invalid push #{pushes[push_.index]['sequence']} was not refused with one alert"

    def champion_on_newest_valid_push() -> Iterator[str]:
        newest_valid = next((e for e in reversed(history) if valid(e.fingerprint)), None)
        champion_data = good.get(state.champion or "", {}).get("data_fingerprint")
        if newest_valid is None or champion_data != newest_valid.fingerprint:
            yield f"champion {state.champion} trained on {champion_data}, not on the newest valid push {newest_valid}"

    def nothing_retrained_the_champions_data() -> Iterator[str]:
        """Neither a nightly nor a push's run (a re-push, or one that waited while a nightly trained
        its push) trains the data the champion of its start was trained on."""
        promotions = [(dt.datetime.fromisoformat(str(e["at"])), e["model_id"]) for e in state.history]
        for run in retrains.values():
            kind = "push run" if run.parameters.get("trigger_event") else "nightly"
            for version, spec in good.items():
                if spec.get("run_id") == flow_training_run_id(str(spec.get("data_fingerprint")), run.id):
                    before = [model for at, model in promotions if at < run.start_time]
                    if before and good.get(before[-1], {}).get("data_fingerprint") == spec["data_fingerprint"]:
                        yield f"{kind} {run.name} trained {version} on the data of champion {before[-1]}"

    def one_version_per_training_run() -> Iterator[str]:
        run_ids = [s.get("run_id") for s in good.values()]
        yield from (f"training run {r} registered {run_ids.count(r)} versions" for r in set(run_ids)
                    if run_ids.count(r) != 1)

    def nothing_left_running() -> Iterator[str]:
        yield from (f"left unfinished: {u}" for u in left_unfinished(soak.stack))
        yield from (f"run {r.name} not final: {r.state_type.value}" for r in runs if not r.state.is_final())

    def each_failure_alerted_once() -> Iterator[str]:
        failures = [r for r in runs if r.state.type.value in ("FAILED", "CRASHED")
                    or (r.state.type.value == "CANCELLED" and str(r.id) in retrains and r.created_by is not None
                        and r.created_by.type == "AUTOMATION")]
        deadline = time.monotonic() + ALERT_WAIT_S
        while any(alerts_about(soak, r.id) == 0 for r in failures) and time.monotonic() < deadline:
            time.sleep(2)
        # A duplicate would come right behind the first: wait out that window after the newest
        # alert (mostly long past: the failures came nights before the audit).
        newest = soak.stack.receiver.last_arrival(lambda m: any(str(r.id) in m.get("text", "") for r in failures))
        if newest is not None:
            time.sleep(max(0.0, DUPLICATE_ALERT_WINDOW_S - (time.monotonic() - newest)))
        yield from (f"{r.name} ended {r.state.name} ({r.state.message}): {alerts_about(soak, r.id)} alerts"
                    for r in failures if alerts_about(soak, r.id) != 1)

    def outage_ridden_out_by_task_retries() -> Iterator[str]:
        """The run S3 went down under completed, and on a task's retry: an outage the S3 client's own
        retries absorbed would prove nothing about the tasks'."""
        [run] = [r for r in runs if r.id == soak.outage_run.id]  # read after every run ended
        with soak.stack.client() as client:
            retried = [t.name for t in task_runs(client, run.id) if t.run_count > 1]
        if not run.state.is_completed():
            yield f"the S3 outage's run {run.name} ended {run.state.name}: {run.state.message}"
        if not retried:
            yield f"no task of {run.name} was retried: the S3 outage was absorbed below the tasks' retries"

    def fault_struck_runs_recovered() -> Iterator[str]:
        """Each retrain a fault struck completed, and a training whose host was killed or restarted was
        dispatched again under its run id, that attempt completing. Without this a broken re-dispatch
        passed: the struck run failed with one alert, and the night's queued nightly trained its data."""
        by_id = {r.id: r for r in runs}
        for fault, run_id, train in soak.struck:
            run = by_id[run_id]
            if not run.state.is_completed():
                yield f"{fault}: the retrain {run.name} it struck ended {run.state.name}: {run.state.message}"
            if fault in ("sigkill", "restart"):
                attempts = [t for t in train_runs(soak.stack, run_id)
                            if t.parameters.get("run_id") == train.parameters.get("run_id")]
                if len(attempts) < 2 or not attempts[-1].state.is_completed():
                    yield (f"{fault}: training {train.parameters.get('run_id')} of {run.name} was not dispatched again "
                           f"to completion: {[a.state.name for a in attempts]}")

    def hosts_clean_and_caches_bounded() -> Iterator[str]:
        def project_temp(root: Path) -> list[Path]:
            return [p for p in (root / "tmp").iterdir() if not p.name.startswith(TORCH_TEMP)] \
                if (root / "tmp").exists() else []

        workspaces = 0
        for root in soak.host_roots():
            # A worker removes a run's working directory after the run's process exits: the last
            # night's may still be going when its run reads Completed. A killed run's stays, last
            # changed before the kill; on a restarted host, a later run's is removed as anywhere.
            def removing(paths: list[Path], killed_at: float = soak.killed.get(root, -math.inf)) -> bool:
                return any(changed_at(p) > killed_at for p in paths)

            deadline = time.monotonic() + WORKSPACE_REMOVAL_WAIT_S
            while removing(left := project_temp(root)) and time.monotonic() < deadline:
                time.sleep(0.2)
            if root in soak.killed:  # what the killed flow runs left: counted, bounded below
                # Only what was there at the kill: a restarted host serves the rest of the month, and
                # what its later runs leave is a leak like any other host's.
                later = [p for p in left if changed_at(p) > soak.killed[root]]
                if later:
                    yield f"{root.name}'s temp folder holds {sorted(p.name for p in later)} from after its kill"
                left = [p for p in left if p not in later]
                soak.debris += left
                workspaces += sum(1 for p in left if run_workspace(p))
            elif left:
                yield f"{root.name}'s temp folder holds {sorted(p.name for p in left)}"
            if (used := disk_bytes([root / "cache"])) > max_cache_bytes():
                yield f"{root.name}'s cache holds {used} bytes, over its bound {max_cache_bytes()}"
        kills = sum(1 for f in soak.faults if f.startswith(("sigkill", "restart")))
        # Each kill ends exactly one flow run (a worker runs one at a time), which leaves its working
        # directory: more is a leak, fewer means the count no longer sees them.
        if workspaces != kills:
            yield f"{workspaces} run workspaces left on killed hosts after {kills} kills: {soak.debris}"

    violations: list[str] = []
    for check in (pushes_accounted, champion_on_newest_valid_push, nothing_retrained_the_champions_data,
                  one_version_per_training_run, nothing_left_running, each_failure_alerted_once,
                  outage_ridden_out_by_task_retries, fault_struck_runs_recovered, hosts_clean_and_caches_bounded):
        try:
            violations += list(check())
        except Exception as exc:  # a broken check is reported, never mistaken for a clean month
            violations.append(f"check {check.__name__} raised {exc!r}")
    return violations, len(good)


def test_a_month_of_nightly_runs_pushes_and_faults_loses_nothing(soak: Soak, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = make_plan(SEED, NIGHTS)
    print(f"\nsoak seed {plan.seed} (SOAK_SEED), {plan.nights} nights (PROTEIN_SOAK_NIGHTS); pushes "
          + ", ".join(f"night {p.night} push {p.describe()}" for p in plan.pushes)
          + f"; S3 down on night {plan.s3_outage_night}")
    for name, value in soak.stack.env.items():  # this process reads the store for the audit
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    started = time.monotonic()
    disk_start = disk_bytes([p / sub for p in soak.host_roots() for sub in ("cache", "tmp")])
    pushes: dict[int, dict[str, Any]] = {}
    try:
        nightlies, push_runs = live_calendar(soak, plan, pushes)
        violations, versions = audit(soak, pushes, plan)
    except BaseException:
        print(f"soak failed: SOAK_SEED={plan.seed} PROTEIN_SOAK_NIGHTS={plan.nights}; faults so far: {soak.faults}")
        raise
    print("\n".join(violations))
    disk_end = disk_bytes([p / sub for p in soak.host_roots() for sub in ("cache", "tmp")])
    print(f"soak tally: seed {plan.seed}, {len(nightlies)} nightly + {len(push_runs)} push runs, {len(pushes)} pushes, "
          f"{len(soak.faults)} faults, {versions} versions, {len(violations)} violations, host disk "
          f"{disk_start / 1e6:.1f} MB at start, {disk_end / 1e6:.1f} MB at end (of which left by killed runs "
          f"{disk_bytes(soak.debris) / 1e6:.1f} MB), {time.monotonic() - started:.0f} s, a quiet night "
          f"{statistics.median(soak.quiet_nights_s or [0.0]):.1f} s (median of {len(soak.quiet_nights_s)})")
    print("faults: " + "; ".join(soak.faults))
    # How each lost run was caught (the dispatcher's message): which bound it waited out.
    print("lost runs: " + "; ".join(f"{r.name}: {r.state.message}" for r in all_flow_runs(soak)
                                   if r.state is not None and r.state.type.value == "CRASHED"))
    print("slowest nights: " + "; ".join(f"{what} {s:.0f} s" for s, what in sorted(soak.nights_s, reverse=True)[:10]))
    assert len(soak.faults) == len(FAULTS) + 1, soak.faults
    assert not violations, f"SOAK_SEED={plan.seed}: " + "\n".join(violations)
