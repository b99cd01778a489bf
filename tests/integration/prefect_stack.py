"""One real Prefect deployment stack shared by the events and browser tests: the highly available
server of deployments/ha_stack/ (two APIs with the UI behind nginx, the services process,
PostgreSQL, Redis), a process worker on the cpu pool talking to nginx, `prefect deploy` from
deployments/prefect.yaml and the automations applied by the deploy wrapper, with the webhook
pointed at a receiver on 127.0.0.1, and an S3 store on the test moto server whose dataset channel
holds one push before the deploy (the wrapper refuses an empty channel)."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.ha_stack import HAPrefect, Postgres, start_ha_prefect, stop_ha_prefect
from tests.conftest import MotoServer
from tests.helpers import REPO, write_dataset
from tests.integration.fault_proxy import BurstServer, FaultProxy
from tests.integration.prefect_services import (
    WAIT_POLL_S,
    WORKER_QUERY_S,
    Service,
    aws_env,
    deploy_from_fresh_clone,
    git_remote_of_worktree,
    host_env,
    prefect_env,
    pushing_while_the_server_starts,
    s3_client,
    stop_all,
)

if TYPE_CHECKING:
    from tests.integration.dead_run import DeadRun

RUN_TIMEOUT_S = 420.0
HEARTBEAT_S = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of the stack's runs: the minimum Prefect allows
# The zombie window the tests apply: three heartbeats, so a live run on a loaded machine may miss two
# (a late beat, a stalled event loop) and not be crashed; below the file's 120 s so the zombie test waits less.
TEST_ZOMBIE_AFTER_S = 3 * HEARTBEAT_S
TEST_IDS = ["900", "901", "902"]
# Deployment defaults for tests: tiny images, one epoch, training and scoring inside the retrain
# run (this stack has no gpu-pool worker).
TINY_NIGHTLY = {
    "train_deployment": None,
    "score_deployment": None,
    # resnet18, not tests.helpers.TINY_ARCH: test_push_queue needs the first retrain still training while
    # two more pushes arrive, and the soak's faults land while a retrain trains (tried: with the
    # smaller model the first run ended before the pushes, and the API kill landed mid-summary).
    "train": {"epochs": 1, "image_size": 32, "batch_size": 8},
    "validation": {"image_size": 40, "check_pixels": True},
    "gate_config": {"min_score": 0.0},
}


def lenient_definition(gate: Mapping[str, Any] = TINY_NIGHTLY["gate_config"]) -> str:
    text = (REPO / "deployments" / "prefect.yaml").read_text()
    anchor = "      skip_if_unchanged: false\n    concurrency_limit: *one_at_a_time\n"
    assert anchor in text, "deployments/prefect.yaml changed: update lenient_definition()"
    return text.replace(anchor, f"      gate_config: {json.dumps(dict(gate))}\n{anchor}", 1)


class Receiver:
    """A webhook endpoint on 127.0.0.1 that keeps every JSON body POSTed to it, and when it came
    (``arrived``: this host's monotonic clock, one entry per message, in the same order)."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.arrived: list[float] = []
        self.lock = threading.Lock()
        received, arrived, lock = self.messages, self.arrived, self.lock

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    message = json.loads(body)
                except ValueError:
                    message = {"raw": body.decode(errors="replace")}
                with lock:  # a reader pairs messages[i] with arrived[i]
                    arrived.append(time.monotonic())
                    received.append(message)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = BurstServer(("127.0.0.1", 0), Handler)  # the OS picks the port; read back below
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout_s: float = 120.0,
                 describe: Callable[[], str] = str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for message in list(self.messages):
                if predicate(message):
                    return message
            time.sleep(0.5)
        raise AssertionError(f"no webhook message {what} within {timeout_s:.0f}s; got {self.messages}\n{describe()}")

    def last_arrival(self, predicate: Callable[[dict[str, Any]], bool]) -> float | None:
        """When the newest message that matches arrived (monotonic), or None."""
        with self.lock:
            pairs = list(zip(self.arrived, self.messages, strict=True))
        return max((at for at, message in pairs if predicate(message)), default=None)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    env: dict[str, str]
    api_url: str
    ui_url: str
    store: str
    dataset: Path
    receiver: Receiver
    ha: HAPrefect
    services: list[Service] = field(default_factory=list)
    # A run whose machine died, made since the stack came up when a selected test asserts on it
    # (tests/integration/dead_run.py).
    dead_run: DeadRun | None = None
    # One open client per thread, for the stack's life: the tests poll the API many times a second
    # while they wait, and a new client each time (settings copy, SSL context, version check) took
    # more CPU than the requests it sent.
    _clients: dict[int, Any] = field(default_factory=dict)
    _clients_lock: threading.Lock = field(default_factory=threading.Lock)

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        with self._clients_lock:
            client = self._clients.get(threading.get_ident())
        if client is None:
            from prefect.client.orchestration import get_client
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
                client = get_client(sync_client=True)
                client.__enter__()
            with self._clients_lock:
                self._clients[threading.get_ident()] = client
        yield client

    def close_clients(self) -> None:
        with self._clients_lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.__exit__(None, None, None)

    def logs(self) -> str:
        return "\n".join([*(s.log_tail() for s in self.services), self.ha.logs()])

    def python(self, code: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run Python in a fresh process with the stack's environment (as a CLI user would)."""
        return subprocess.run([sys.executable, "-c", code], env=self.env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout_s)

    def without_champion(self) -> None:
        """Delete the store's champion pointer, as a test's own set-up: the stack is shared, another
        test may have promoted already (in whatever order they run), and a test that asserts a first
        promotion must start from a store without a champion."""
        from protein.registry.records import CHAMPION_KEY

        bucket, _, prefix = self.store.removeprefix("s3://").partition("/")
        s3_client(self.env["AWS_ENDPOINT_URL"]).delete_object(Bucket=bucket, Key=f"{prefix}/{CHAMPION_KEY}")

    def wait_final(self, flow_run_id: Any, timeout_s: float = RUN_TIMEOUT_S) -> Any:
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                run = client.read_flow_run(flow_run_id)
                if run.state is not None and run.state.is_final():
                    return run
                for service in self.services:
                    assert service.alive(), f"{service.name} exited\n{self.logs()}"
                for daemon in self.ha.daemons():
                    assert daemon.alive(), f"{daemon.name} exited\n{self.logs()}"
                if time.monotonic() > deadline:
                    raise AssertionError(f"run {run.name} not final after {timeout_s:.0f}s: {run.state}\n{self.logs()}")
                time.sleep(WAIT_POLL_S)

    def wait_run(self, deployment: str, match: Callable[[Any], bool], what: str, timeout_s: float = 120.0) -> Any:
        """The first flow run of ``deployment`` that ``match`` accepts (e.g. one a trigger created)."""
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            dep = client.read_deployment_by_name(deployment)
            while time.monotonic() < deadline:
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                found = [r for r in runs if match(r)]
                if found:
                    return found[0]
                time.sleep(WAIT_POLL_S)
        raise AssertionError(f"no {deployment} run {what} within {timeout_s:.0f}s\n{self.logs()}")

    def artifacts(self, flow_run_id: Any) -> dict[str, Any]:
        """This run's artifacts by key (latest version of each), read by flow run id."""
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
        from prefect.client.schemas.sorting import ArtifactSort

        with self.client() as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])), sort=ArtifactSort.CREATED_DESC)
        by_key: dict[str, Any] = {}
        for artifact in found:
            by_key.setdefault(artifact.key, artifact)
        return by_key

    def run_logs(self, flow_run_id: Any) -> list[str]:
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        messages: list[str] = []
        with self.client() as client:
            while True:
                page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                        limit=200, offset=len(messages))
                messages += [log.message for log in page]
                if len(page) < 200:
                    return messages

    def wait_events(self, prefix: str, related_id: str, names: set[str], timeout_s: float = 60.0) -> dict[str, Any]:
        """The events named ``names`` related to ``related_id``, by name; the server stores events
        asynchronously, a moment after the run that emitted them has finished."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = {e["event"]: e for e in self.events(prefix, related_id)}
            if names <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(1)

    def events(self, prefix: str, related_id: str | None = None,
               since: dt.datetime | None = None) -> list[dict[str, Any]]:
        """Events whose name starts with ``prefix`` (optionally related to a resource id, or occurred
        since a moment: the server holds the whole session's events, oldest first, 50 a page)."""
        body: dict[str, Any] = {"filter": {"event": {"prefix": [prefix]}, "order": "ASC"}, "limit": 50}
        if related_id:
            body["filter"]["any_resource"] = {"id": [related_id]}
        if since is not None:
            body["filter"]["occurred"] = {"since": since.isoformat(),
                                          "until": (dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)).isoformat()}
        with self.client() as client:
            response = client._client.post("/events/filter", json=body)
            response.raise_for_status()
            return response.json()["events"]


def start_stack(tmp: Path, s3: MotoServer | FaultProxy, pg: Postgres,
                gate: Mapping[str, Any] = TINY_NIGHTLY["gate_config"],
                worker_query_s: float = WORKER_QUERY_S) -> Stack:
    """``s3``: the S3 endpoint every process uses (a FaultProxy in front of the server, to take it
    down); ``gate``: the gate of the definition in git, which scheduled and triggered runs take;
    ``worker_query_s``: how often the CPU host's worker asks for runs."""
    aws = aws_env(s3.endpoint)
    bucket = f"stack-{uuid.uuid4().hex[:12]}"
    s3_client(s3.endpoint).create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/prod"
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    dataset = write_dataset(tmp / "ds", labels, TEST_IDS, size=40)
    # Only the moto server's credentials: an inherited AWS_PROFILE would name a profile that
    # AWS_CONFIG_FILE=/dev/null does not have.
    base = prefect_env(tmp / "prefect-home", drop=("AWS_",), extra={
        **aws,
        "PROTEIN_STORE": store,
        "PROTEIN_CACHE_DIR": str(tmp / "cache"),
        "PYTHONPATH": str(REPO),
    })
    # Operators push a dataset first: the nightly follows channel:latest, and deploy checks it.
    with pushing_while_the_server_starts(dataset, store, base) as pushed:
        # The UI stays on (the browser test); the scheduler is off: the nightly cron must not add runs.
        ha = start_ha_prefect(tmp / "ha", pg, base, ui=True)
        env = ha.client_env(base)
        stack = Stack(env=env, api_url=ha.api_url, ui_url=ha.ui_url, store=store, dataset=dataset,
                      receiver=Receiver(), ha=ha)
        try:
            # The CPU host's worker starts while the dataset is pushed and the deploy runs, so that its
            # start-up (~2.5 s) is not on the way to the first run: on its pool, created first as the
            # deploy wrapper creates it (the wrapper then finds it there and creates the gpu pool).
            from deployments.deploy import process_pool

            with stack.client() as client:
                client.create_work_pool(process_pool("cpu"))
            host = tmp / "cpu-host"
            stack.services.append(Service("worker-cpu", ["worker", "start", "--pool", "cpu", "--name", "cpu-host",
                                                         "--no-create-pool-if-not-found"],
                                          host_env(env, host, {"PREFECT_WORKER_QUERY_SECONDS": str(worker_query_s)}),
                                          tmp, cwd=host))
            pushed()
            # Deployed as operators do: the deploy wrapper from a clone; the worker clones that commit.
            # Runs the deployment trigger starts take the gate of the definition in git, not of the API
            # (docs/security.md), so the commit the worker clones carries the tests' lenient gate.
            # The wrapper also applies the automations, with the webhook on the receiver.
            remote, _ = git_remote_of_worktree(tmp, {"deployments/prefect.yaml": lenient_definition(gate)})
            deployed = deploy_from_fresh_clone({**env, "PROTEIN_ALERT_WEBHOOK_URL": stack.receiver.url,
                                                "PROTEIN_ZOMBIE_AFTER_S": str(TEST_ZOMBIE_AFTER_S)}, remote, tmp)
            assert deployed.returncode == 0, f"deploy failed:\n{deployed.stdout[-3000:]}\n{deployed.stderr[-3000:]}"
            from prefect.client.schemas.actions import DeploymentUpdate

            with stack.client() as client:
                nightly = client.read_deployment_by_name("retrain/nightly")
                client.update_deployment(nightly.id, DeploymentUpdate(parameters={**nightly.parameters,
                                                                                  **TINY_NIGHTLY}))
                applied = {a.name for a in client.read_automations()}
            assert {"protein-run-failed", "protein-push-retrain-cancelled", "protein-crash-zombie-runs"} <= applied, \
                f"the deploy wrapper did not apply the automations: {sorted(applied)}\n{deployed.stdout}"
        except BaseException:
            stop_stack(stack)
            raise
    return stack


def stop_stack(stack: Stack) -> None:
    stack.close_clients()
    stop_all(stack.services)
    stop_ha_prefect(stack.ha)
    stack.receiver.close()
    leftover = [s.name for s in stack.services if s.alive()]
    assert not leftover, f"still running after stop: {leftover}"
