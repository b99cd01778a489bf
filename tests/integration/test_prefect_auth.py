"""The production Prefect API is not open: a real `prefect server start` with Prefect's server-side
basic auth (PREFECT_SERVER_API_AUTH_STRING) refuses clients without the auth string, while the CLI
and a process worker configured with it (PREFECT_API_AUTH_STRING) deploy and run a flow. The auth
string is a secret: it ends up in no log, database row or file the server, CLI or worker wrote."""

from __future__ import annotations

import json
import secrets
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.prefect_services import (
    PREFECT,
    Service,
    prefect_cli,
    prefect_env,
    start_server,
    stop_all,
    wait_final,
    worker_args,
)

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 240.0
FLOW = '''
from prefect import flow


@flow(name="auth-hello", log_prints=True)
def hello(name: str = "world") -> str:
    print(f"hello {name} from an authenticated worker")
    return f"hello {name}"
'''


def prefect_yaml(project: Path) -> str:
    # A trivial deployment: the flow file lives in `project`, which the pull step makes the working directory.
    return f"""
name: auth-test
prefect-version: 3.9.1
build: null
push: null
pull:
  - prefect.deployments.steps.set_working_directory:
      directory: "{project}"
deployments:
  - name: hello
    entrypoint: hello.py:hello
    work_pool:
      name: cpu
"""


def http_status(url: str, method: str = "GET", auth: str | None = None, body: dict | None = None) -> int:
    import base64

    request = urllib.request.Request(url, method=method, data=json.dumps(body or {}).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_unauthenticated_clients_are_refused_and_a_configured_worker_runs_a_deployment(
    tmp_path: Path, services: list[Service]
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    # A fresh secret per test run: user:password, as the UI's login form takes it.
    auth = f"admin:{secrets.token_urlsafe(24)}"
    password = auth.split(":", 1)[1]
    env = prefect_env(tmp_path / "server-home")
    api = env["PREFECT_API_URL"]
    server_env = {**env, "PREFECT_SERVER_API_AUTH_STRING": auth}
    # Clients and workers: their own homes, the API URL and the auth string; never the server's database.
    client_env = {k: v for k, v in env.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
    client_env.update({"PREFECT_HOME": str(tmp_path / "client-home"), "PREFECT_API_AUTH_STRING": auth})
    anonymous_env = {k: v for k, v in client_env.items() if k != "PREFECT_API_AUTH_STRING"}
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello.py").write_text(FLOW)
    (project / "prefect.yaml").write_text(prefect_yaml(project))

    start_server(server_env, tmp_path, services)  # its health probe is the one open endpoint

    # Refused without the auth string, or with a wrong one: reading, and starting runs.
    assert http_status(f"{api}/flows/filter", "POST", body={"limit": 1}) == 401
    assert http_status(f"{api}/flows/filter", "POST", auth="admin:wrong", body={"limit": 1}) == 401
    assert http_status(f"{api}/flows/filter", "POST", auth=auth, body={"limit": 1}) == 200
    refused = subprocess.run([str(PREFECT), "work-pool", "ls"], env=anonymous_env, capture_output=True,
                             text=True, timeout=180)
    assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr, refused.stdout + refused.stderr

    # The CLI and a worker with the auth string work as usual.
    prefect_cli(client_env, "work-pool", "create", "cpu", "--type", "process")
    prefect_cli(client_env, "--no-prompt", "deploy", "--all", "--prefect-file", str(project / "prefect.yaml"),
                cwd=project)
    worker_home = tmp_path / "worker-home"
    services.append(Service("worker-cpu", worker_args("cpu", "auth-worker"),
                            {**client_env, "PREFECT_HOME": str(worker_home)}, tmp_path, cwd=project))

    with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: None}), \
            get_client(sync_client=True) as anonymous, pytest.raises(PrefectHTTPStatusError, match="401"):
        anonymous.read_deployment_by_name("auth-hello/hello")
    with temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_AUTH_STRING: auth}), \
            get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("auth-hello/hello")
        # Anyone who reaches the port without the string cannot start a run.
        assert http_status(f"{api}/deployments/{deployment.id}/create_flow_run", "POST", body={}) == 401
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"name": "security"})
        run = wait_final(client, run.id, RUN_TIMEOUT_S, services)
        assert run.state is not None and run.state.is_completed(), f"{run.state}\n{services[-1].log_tail()}"
        assert run.work_pool_name == "cpu"
        assert len(client.read_flow_runs()) == 1, "the refused request started nothing"
    worker_log = services[-1].log()
    assert "hello security from an authenticated worker" in worker_log, worker_log[-3000:]

    # The secret is in no file anyone wrote: server database (and its WAL), homes, logs, the project;
    # read once every process stopped and flushed what it writes.
    stop_all([s for s in services if s.name != "server"])
    stop_all(services)
    scanned = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.startswith("prefect.db") for p in scanned)
    leaked = [str(p) for p in scanned if password.encode() in p.read_bytes()]
    assert leaked == [], leaked
