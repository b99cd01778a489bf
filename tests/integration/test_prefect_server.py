"""The deployments as operators run them: a real Prefect server, work pools, `prefect deploy`
from deployments/prefect.yaml, process workers for both pools, and a retrain run triggered
through the API that trains on the gpu pool and leaves a champion and a submission in S3."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.helpers import REPO, write_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PREFECT = Path(sys.executable).parent / "prefect"
TEST_IDS = ["900", "901", "902"]
SERVER_START_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
# An idle worker ignores the first SIGTERM; the second stops it.
STOP_STEPS = ((signal.SIGTERM, 3.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


class Service:
    """A long-running `prefect` process in its own session, so stopping it stops its children
    (a worker's flow runs) too. Output goes to a file: a pipe nobody reads would fill and block."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([str(PREFECT), *args], env=env, cwd=REPO, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        self.process.poll()  # reap the leader, or its zombie keeps the group alive
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, chars: int = 3000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.name} (last {chars} chars) ---\n{text[-chars:]}"


def stop_all(services: list[Service]) -> None:
    """Escalate TERM, TERM, KILL over the process groups of all services at once."""
    for sig, grace in STOP_STEPS:
        running = [s for s in services if s.alive()]
        if not running:
            return
        for service in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(service.process.pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(s.alive() for s in running):
            time.sleep(0.1)


def prefect_cli(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([str(PREFECT), *args], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=CLI_TIMEOUT_S)
    assert result.returncode == 0, (f"prefect {' '.join(args)} exited {result.returncode}:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def wait_healthy(api_url: str, server: Service) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"prefect server exited early\n{server.log_tail()}"
        try:
            with urllib.request.urlopen(f"{api_url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"prefect server not healthy within {SERVER_START_TIMEOUT_S:.0f}s\n{server.log_tail()}")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    return write_dataset(tmp_path / "ds", labels, TEST_IDS, size=40)


@pytest.fixture
def prefect_env(tmp_path: Path, s3_bucket: str, dataset: Path) -> dict[str, str]:
    """Environment of every Prefect process: a fresh home and sqlite DB, the API on a free
    loopback port, the test S3 server (AWS_* set by s3_bucket), no telemetry, no prompts."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {
        **inherited,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        # Workers poll every 10 s by default; the retrain run waits on two submissions.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PROTEIN_STORE": s3_bucket,
        "PROTEIN_DATA": str(dataset),
        # The flows' image cache goes here, not into the checkout's work/ folder.
        "PROTEIN_CACHE_DIR": str(tmp_path / "cache"),
        # prefect.yaml's pull step is `{{ $PWD }}`: the shell sets PWD, subprocess does not.
        "PWD": str(REPO),
    }


@pytest.fixture
def services(tmp_path: Path) -> Iterator[list[Service]]:
    """Started services, stopped at teardown whatever happened: workers first, then the server."""
    started: list[Service] = []
    yield started
    stop_all([s for s in started if s.name != "server"])
    stop_all(started)
    leftover = [s.name for s in started if s.alive()]
    assert not leftover, f"still running after stop: {leftover}"


def test_retrain_deployment_trains_on_gpu_pool_and_publishes(
    prefect_env: dict[str, str], services: list[Service], s3_bucket: str, dataset: Path, tmp_path: Path
) -> None:
    env, api_url = prefect_env, prefect_env["PREFECT_API_URL"]
    # No scheduler: the nightly cron must not add runs of its own; no UI: nothing to serve.
    server = Service("server", ["server", "start", "--host", "127.0.0.1", "--port", env["PREFECT_SERVER_API_PORT"],
                                "--no-scheduler", "--no-ui", "--analytics-off"], env, tmp_path)
    services.append(server)
    wait_healthy(api_url, server)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda args: prefect_cli(env, *args), [
            ("work-pool", "create", "cpu", "--type", "process"),
            ("work-pool", "create", "gpu", "--type", "process"),
            ("global-concurrency-limit", "create", "gpu", "--limit", "1"),
        ]))
    for pool_name in ("cpu", "gpu"):
        services.append(Service(f"worker-{pool_name}", ["worker", "start", "--pool", pool_name, "--name",
                                                        f"test-{pool_name}", "--no-create-pool-if-not-found"],
                                env, tmp_path))
    prefect_cli(env, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml")

    def logs() -> str:
        return "\n".join(s.log_tail() for s in services)

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    parameters = {
        "data": str(dataset),
        "store": s3_bucket,
        "train": {"epochs": 1, "image_size": 32, "batch_size": 8},
        "validation": {"image_size": 40, "check_pixels": True},
        "gate_config": {"min_score": 0.0},
    }
    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("retrain/nightly")
        assert nightly.parameters["train_deployment"] == "train/gpu"
        run = client.create_flow_run_from_deployment(nightly.id, parameters=parameters)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            run = client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                break
            for service in services:
                assert service.process.poll() is None, f"{service.name} exited during the run\n{logs()}"
            if time.monotonic() > deadline:
                pytest.fail(f"retrain not final after {RUN_TIMEOUT_S:.0f}s: {run.state}\n{logs()}")
            time.sleep(1)
        assert run.state.is_completed(), f"retrain ended {run.state.name}: {run.state.message}\n{logs()}"

        train_gpu = client.read_deployment_by_name("train/gpu")
        by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[train_gpu.id]))
        train_runs = client.read_flow_runs(deployment_filter=by_deployment)
        assert len(train_runs) == 1, f"expected one train/gpu run, got {[r.name for r in train_runs]}\n{logs()}"
        train_run = train_runs[0]
        assert train_run.state is not None and train_run.state.is_completed(), train_run.state
        assert train_run.parent_task_run_id is not None, "train/gpu runs as a child of the retrain run"
        assert (run.work_pool_name, train_run.work_pool_name) == ("cpu", "gpu")
        gpu_limit = client.read_global_concurrency_limit_by_name("gpu")
        assert gpu_limit.active_slots == 0, "training released its gpu slot"

    from protein.registry import Registry
    from protein.storage import open_store

    store = open_store(s3_bucket)
    registry = Registry(store)
    champion = registry.champion().champion
    assert champion is not None and champion in registry.versions()
    assert registry.find_by_run(train_run.parameters["run_id"]) == champion, "the gpu run's model was promoted"

    latest = json.loads(store.get_bytes("submissions/latest.json"))
    assert latest["model_id"] == champion
    lines = store.get_bytes(latest["key"]).decode().splitlines()
    assert lines[0] == "Image,Label"
    assert [line.split(",")[0] for line in lines[1:]] == TEST_IDS
