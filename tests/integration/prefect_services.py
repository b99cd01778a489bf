"""Real Prefect processes for integration tests: a server, process workers, the CLI, and a git
"remote" the deployments' pull step clones. Import these; do not copy them.

    env = prefect_env(tmp_path / "prefect-home", extra={"PROTEIN_STORE": store})
    server = start_server(env, tmp_path, services)   # services: the `services` fixture's list
    services.append(Service("worker-gpu", worker_args("gpu", "w1"), host_env, tmp_path, cwd=host_dir))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port
from tests.helpers import REPO

PREFECT = Path(sys.executable).parent / "prefect"
SERVER_START_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 180.0
# How often a test asks the API about the run it waits on: a run is often done within a second.
WAIT_POLL_S = 0.25
# Workers poll every 10 s by default; a retrain waits on two submissions, the soak on ~50 runs.
WORKER_QUERY_S = 1.0
# An idle worker ignores the first SIGTERM; the second stops it.
STOP_STEPS = ((signal.SIGTERM, 3.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0))


class Service:
    """A long-running `prefect` process in its own session, so stopping it stops its children
    (a worker's flow runs) too. Output goes to a file: a pipe nobody reads would fill and block."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path,
                 cwd: Path = REPO) -> None:
        self.name = name
        self.killed = False  # stopped or killed on purpose by the test
        self.cwd = cwd
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([str(PREFECT), *args], env=dict(env), cwd=cwd, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        self.process.poll()  # reap the leader, or its zombie keeps the group alive
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self, host_root: Path | None = None) -> None:
        """SIGKILL the worker's process group at once, as a host losing power would: no cleanup
        runs. Prefect starts each flow run in a session of its own, so the flow-run processes of
        that "host" (every process whose working directory lies under host_root) die with it."""
        self.killed = True
        doomed = processes_under(host_root) if host_root is not None else []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (self.alive() or any(Path(f"/proc/{pid}").exists() for pid in doomed)) and time.monotonic() < deadline:
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} (last {chars} chars) ---\n{self.log()[-chars:]}"


def processes_under(root: Path) -> list[int]:
    """Ids of this user's processes whose working directory lies under root (Linux /proc)."""
    root = root.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")).is_relative_to(root):
                    found.append(int(entry.name))
    return found


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


@contextlib.contextmanager
def running_services() -> Iterator[list[Service]]:
    """A list to append started services to; all stopped on the way out whatever happened:
    workers first, then the server."""
    started: list[Service] = []
    try:
        yield started
    finally:
        stop_all([s for s in started if s.name != "server"])
        stop_all(started)
        # Flow runs live in sessions of their own: a worker's stop does not reach an orphan.
        for pid in [pid for s in started if s.cwd != REPO for pid in processes_under(s.cwd)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    leftover = [s.name for s in started if s.alive()]
    assert not leftover, f"still running after stop: {leftover}"


def prefect_env(home: Path, extra: Mapping[str, str] | None = None, port: int | None = None,
                drop: tuple[str, ...] = ()) -> dict[str, str]:
    """Environment of a Prefect process: its own home and sqlite DB, the API on loopback at port
    (a free one by default), no telemetry, no prompts. The test's variables are inherited except
    PREFECT_* and those starting with a prefix in drop."""
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", *drop))}
    return {
        **inherited,
        "PREFECT_HOME": str(home),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": str(WORKER_QUERY_S),
        # A run queued behind a deployment's concurrency limit (retrain/nightly: one at a time) asks
        # again this often; the default 30 s left a queued retrain waiting ~20 s after the slot freed.
        "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
        # The events the APIs accept reach the database, where event queries read them, within a
        # second instead of the default five: a killed run's last pulse is seen that much sooner,
        # so the dispatcher's lost-after silence starts that much earlier.
        "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_FLUSH_INTERVAL": "1",
        "DO_NOT_TRACK": "1",
        "GX_ANALYTICS_ENABLED": "false",
        "PREFECT_API_SSL_CERT_FILE": str(one_ca_file(home)),
        **(extra or {}),
    }


def aws_env(endpoint: str) -> dict[str, str]:
    """boto3's standard chain of a process the tests start: moto's endpoint and keys, and nothing
    of the developer's own AWS set-up (no config file, credentials file or instance metadata)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true"}


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client with aws_env's keys, for what a test itself creates or removes in the store."""
    import boto3

    aws = aws_env(endpoint)
    session = boto3.session.Session(aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                                    aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
                                    region_name=aws["AWS_DEFAULT_REGION"])
    return session.client("s3", endpoint_url=endpoint)


def one_ca_file(folder: Path) -> Path:
    """A file holding one CA certificate (the first of certifi's bundle). Prefect builds a verified
    TLS context from the file PREFECT_API_SSL_CERT_FILE names (certifi's bundle by default) for every
    API client it creates, for an http:// API too: ~17 ms each, about eight per flow-run process. The
    test stacks' APIs are plain HTTP on loopback, so nothing is verified against it; one certificate
    loads in 0.6 ms."""
    import certifi

    path = folder / "one-ca.pem"
    if not path.exists():
        bundle = Path(certifi.where()).read_text()
        end = "-----END CERTIFICATE-----"
        path.write_text(bundle[bundle.index("-----BEGIN CERTIFICATE-----"):bundle.index(end) + len(end)] + "\n")
    return path


HOST_SITE = Path(__file__).resolve().parent / "host_site"


def host_env(base: Mapping[str, str], root: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A worker "host" on this machine: an empty directory of its own holding its HOME,
    PREFECT_HOME, caches and temp files, and neither the checkout on its path nor the editable
    install of it, so the project's code comes only from the pull step's clone."""
    for sub in ("home", "prefect", "cache", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in base.items() if k not in ("PYTHONPATH", "PWD", "OLDPWD", "VIRTUAL_ENV")}
    env.update({
        # Only host_site/sitecustomize.py, which switches the venv's editable install of the checkout off.
        "PYTHONPATH": str(HOST_SITE),
        # The virtualenv first, as the runbook starts a worker: flow runs start `python -m prefect.engine`.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), base.get("PATH", os.defpath)]),
        "HOME": str(root / "home"),
        "PREFECT_HOME": str(root / "prefect"),
        "PROTEIN_CACHE_DIR": str(root / "cache"),
        "TMPDIR": str(root / "tmp"),
        "XDG_CACHE_HOME": str(root / "cache" / "xdg"),
        # Several "hosts" share this machine's cores: one torch thread each avoids oversubscription.
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    })
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)  # a worker talks to the API, never the DB
    return env


def start_server(env: Mapping[str, str], log_dir: Path, services: list[Service]) -> Service:
    # No scheduler: the nightly cron must not add runs of its own; no UI: nothing to serve.
    server = Service("server", ["server", "start", "--host", "127.0.0.1", "--port", env["PREFECT_SERVER_API_PORT"],
                                "--no-scheduler", "--no-ui", "--analytics-off"], env, log_dir)
    services.append(server)
    wait_healthy(env["PREFECT_API_URL"], server)
    return server


def worker_args(pool: str, name: str) -> list[str]:
    # --limit 1: one flow run at a time per worker, i.e. one training per GPU it owns.
    return ["worker", "start", "--pool", pool, "--name", name, "--limit", "1", "--no-create-pool-if-not-found"]


def prefect_cli(env: Mapping[str, str], *args: str, cwd: Path = REPO) -> str:
    result = subprocess.run([str(PREFECT), *args], env=dict(env), cwd=cwd, capture_output=True, text=True,
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


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def pushing_while_the_server_starts(dataset: Path, store: str, env: Mapping[str, str]) -> Iterator[Callable[[], dict]]:
    """The operators' first `protein datasets push`, started at once in the background: it needs
    only the store, so it runs while a server starts (~2 s off a stack's start), and without
    PREFECT_API_URL: nothing is deployed yet to react to its event. Yields a function that waits
    for it and returns what it printed (its JSON line); killed if the block ends before that."""
    pushing = subprocess.Popen([sys.executable, "-m", "protein.cli", "datasets", "push", "--data", str(dataset),
                                "--store", store], env={k: v for k, v in env.items() if k != "PREFECT_API_URL"},
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def pushed() -> dict:
        out, err = pushing.communicate(timeout=CLI_TIMEOUT_S)
        assert pushing.returncode == 0, f"datasets push failed: {out[-2000:]}\n{err[-2000:]}"
        return json.loads(out.strip().splitlines()[-1])

    try:
        yield pushed
    finally:
        if pushing.poll() is None:
            pushing.kill()
            pushing.communicate()


def git_remote_of_worktree(root: Path, rewrite: Mapping[str, str] | None = None) -> tuple[str, str]:
    """A bare repository holding one commit of this checkout as it is now (committed or not,
    untracked files included unless git ignores them): the "remote" workers clone. `rewrite`
    replaces files of that commit (relative path -> text). Returns its file:// URL and the sha."""
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).split("\0")
    snapshot = root / "snapshot"
    for rel in filter(None, files):
        source = REPO / rel
        if source.is_file() and not source.is_symlink():
            target = snapshot / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for rel, text in (rewrite or {}).items():
        (snapshot / rel).write_text(text)
    git("init", "-q", "-b", "main", cwd=snapshot)
    git("add", "-A", cwd=snapshot)
    git("commit", "-q", "-m", "snapshot under test", cwd=snapshot)
    sha = git("rev-parse", "HEAD", cwd=snapshot)
    bare = root / "remote.git"
    git("clone", "-q", "--bare", str(snapshot), str(bare), cwd=root)
    shutil.rmtree(snapshot)
    return bare.as_uri(), sha


# The wrapper runs `prefect deploy` (which imports every flow), checks the repository, store and
# dataset channel, and applies the automations: minutes on a loaded 2-core machine. A hang guard.
DEPLOY_TIMEOUT_S = 600


def deploy_from_fresh_clone(env: Mapping[str, str], remote: str, root: Path, venv_python: str = sys.executable
                            ) -> subprocess.CompletedProcess[str]:
    """Run the deploy wrapper the way an operator does, from a clone of the remote, then delete
    the clone: no worker can read the deploying checkout."""
    clone = root / "deploy-checkout"
    git("clone", "-q", remote, str(clone), cwd=root)
    try:
        return subprocess.run([venv_python, "-m", "deployments.deploy"], cwd=clone, capture_output=True, text=True,
                              timeout=DEPLOY_TIMEOUT_S, env={**{k: v for k, v in env.items() if k != "PYTHONPATH"},
                                                          "PROTEIN_REPOSITORY": remote})
    finally:
        shutil.rmtree(clone)


def wait_final(client: Any, flow_run_id: Any, timeout_s: float, services: list[Service],
               on_poll: Callable[[Any], None] | None = None) -> Any:
    """The flow run once its state is final; fails early when a service dies, with the logs."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        if on_poll:
            on_poll(run)
        for service in services:
            assert service.killed or service.process.poll() is None, (
                f"{service.name} exited during the run\n{all_logs(services)}")
        if time.monotonic() > deadline:
            pytest.fail(f"{run.name} not final after {timeout_s:.0f}s: {run.state}\n{all_logs(services)}")
        time.sleep(WAIT_POLL_S)


def all_logs(services: list[Service]) -> str:
    return "\n".join(s.log_tail() for s in services)
