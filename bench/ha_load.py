"""The single SQLite `prefect server start` against the highly available stack
(deployments/ha_stack/: two APIs behind nginx, the services process, PostgreSQL, Redis), on this
machine, one after the other in one run, under the same load:

- 20 concurrent flow runs, each its own process (as 20 flow runs on workers are), each running
  tasks that log and change state: the orchestration traffic of 20 retrains without their
  training. Reduction, said plainly: 20 real 1-epoch retrains (torch, GX, decode) would take
  2 cores for many minutes and measure the CPU, not the server.
- 200 events pushed through the events websocket (`emit_event`, as `protein datasets push`
  emits protein.dataset.pushed), then counted in the server's event store.
- Meanwhile a probe reads flow runs (POST /api/flow_runs/filter) every 200 ms: API latency.

    python -m bench.ha_load [--runs 20] [--events 200] [--tasks 8]

Completion is counted, not assumed: flow runs that ended Completed, events the server stored.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO, format_table, machine_info, publish
from deployments.ha_stack import PREFECT, Daemon, running_postgres, start_ha_prefect, stop_ha_prefect
from deployments.ha_stack.daemons import http_ok, start_listening

EVENT_NAME = "protein.bench.pushed"
PROBE_EVERY_S = 0.2
EVENTS_SETTLE_S = 120.0
COLUMNS = ["server", "flow_runs_completed", "events_stored", "load_s", "api_p50_ms", "api_p95_ms", "api_requests",
           "errors"]


def base_env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false", "PYTHONPATH": str(REPO)}


@contextlib.contextmanager
def sqlite_server(root: Path) -> Iterator[str]:
    """The default single server: API, UI off, services in the same process, SQLite."""
    env = {**base_env(root / "home"),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}"}

    def launch(port: int) -> Daemon:
        return Daemon("prefect-sqlite", [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                         "--no-ui"], root, env={**env, "PREFECT_SERVER_API_PORT": str(port)},
                      port=port)

    server = start_listening("prefect sqlite server", launch,
                             lambda port: http_ok(f"http://127.0.0.1:{port}/api/health"))
    try:
        yield f"http://127.0.0.1:{server.port}/api"
    finally:
        server.stop()


@contextlib.contextmanager
def ha_server(root: Path) -> Iterator[str]:
    with running_postgres() as pg:
        stack = start_ha_prefect(root, pg, base_env(root / "home"))
        try:
            yield stack.api_url
        finally:
            stop_ha_prefect(stack)


class Probe:
    """Reads flow runs every PROBE_EVERY_S on its own thread; keeps each latency and error."""

    def __init__(self, api_url: str) -> None:
        import httpx

        self.client = httpx.Client(base_url=api_url, timeout=30)
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                response = self.client.post("/flow_runs/filter", json={"limit": 10})
                if response.status_code == 200:
                    self.latencies_ms.append((time.perf_counter() - started) * 1000)
                else:
                    self.errors.append(f"HTTP {response.status_code}")
            except Exception as error:  # noqa: BLE001 (every failure of the API counts as an error)
                self.errors.append(type(error).__name__)
            self.stopping.wait(PROBE_EVERY_S)

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join()
        self.client.close()


def count_events(api_url: str, tag: str) -> int:
    import httpx

    body = {"filter": {"event": {"name": [EVENT_NAME]}, "resource": {"id_prefix": [f"protein.bench.{tag}."]}},
            "limit": 1}
    response = httpx.post(f"{api_url}/events/filter", json=body, timeout=30)
    response.raise_for_status()
    return int(response.json()["total"])


def measure(name: str, api_url: str, root: Path, runs: int, events: int, tasks: int) -> dict[str, Any]:
    env = {**base_env(root / "clients"), "PREFECT_API_URL": api_url}
    tag = uuid.uuid4().hex[:8]
    child = [sys.executable, "-m", "bench.ha_load"]
    with Probe(api_url) as probe:
        started = time.perf_counter()
        flows = [subprocess.Popen([*child, "--child-flow", str(tasks)], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(runs)]
        pusher = subprocess.Popen([*child, "--child-events", str(events), "--tag", tag], env=env, cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        failures = [p.communicate()[1][-300:] for p in [*flows, pusher] if p.wait() != 0]
        load_s = time.perf_counter() - started
        deadline = time.monotonic() + EVENTS_SETTLE_S
        while (stored := count_events(api_url, tag)) < events and time.monotonic() < deadline:
            time.sleep(1)
    completed = sum(1 for p in flows if p.returncode == 0)
    latencies = sorted(probe.latencies_ms)
    return {
        "server": name,
        "flow_runs_completed": f"{completed}/{runs}",
        "events_stored": f"{stored}/{events}",
        "load_s": round(load_s, 1),
        "api_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "api_p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))], 1) if latencies else None,
        "api_requests": len(latencies) + len(probe.errors),
        "errors": len(probe.errors) + len(failures),
        "error_samples": (probe.errors[:5] + failures[:3]),
    }


def child_flow(tasks: int) -> int:
    from prefect import flow, get_run_logger, task

    @task
    def step(index: int) -> int:
        get_run_logger().info("step %d", index)
        return index

    @flow(name="ha-load-probe")
    def probe_flow(count: int) -> int:
        return sum(future.result() for future in step.map(range(count)))

    state = probe_flow(tasks, return_state=True)
    return 0 if state.is_completed() else 1


def child_events(events: int, tag: str) -> int:
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    for index in range(events):
        emit_event(EVENT_NAME, resource={"prefect.resource.id": f"protein.bench.{tag}.{index}"},
                   payload={"index": index})
    EventsWorker.drain_all()  # sent before the process exits
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ha_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--tasks", type=int, default=8, help="tasks per flow run")
    parser.add_argument("--child-flow", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-events", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_flow is not None:
        return child_flow(args.child_flow)
    if args.child_events is not None:
        return child_events(args.child_events, args.tag)

    rows = []
    with tempfile.TemporaryDirectory(prefix="ha-load-") as tmp:
        for name, server in (("sqlite (1 process)", sqlite_server), ("HA (2 APIs + nginx, PG, Redis)", ha_server)):
            root = Path(tmp) / name.split(" ")[0].lower()
            root.mkdir()
            with server(root) as api_url:
                rows.append(measure(name, api_url, root, args.runs, args.events, args.tasks))
    result = {"machine": machine_info(), "load_average_at_end": os.getloadavg(), "runs": args.runs,
              "events": args.events, "tasks_per_run": args.tasks, "rows": rows}
    publish("ha_load", result, format_table(rows, COLUMNS))
    return 0 if all(row["errors"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
