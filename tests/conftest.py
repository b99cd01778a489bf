"""Shared fixtures. Keep this generic: a fixture belongs here only when several test folders use it."""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import idle_worker
from tests.early_release import EarlyRelease
from tests.tiers import (
    DURATIONS_OPTION,
    SHARED_FIXTURE_MODULES,
    DurationRecorder,
    is_xdist_worker,
    mark_slow_and_order,
    refuse_a_disk_too_small_for_the_slow_tier,
    shared_fixture_scheduler,
)

# Before any test imports Prefect or Great Expectations: no telemetry, and no writes to ~/.prefect.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Nor to the user's own cache folder (protein.locations.default_cache_dir). Both live in one folder
# of this session's, removed when the pytest process exits: the cache holds decoded images of every
# dataset the session trained on, hundreds of megabytes a run. At exit, not in pytest_unconfigure:
# tests that run pytest.main() in process (test_tiers.py) end a nested session that would remove
# the outer one's Prefect home and cache under its running server.
SESSION_SCRATCH = Path(tempfile.mkdtemp(prefix="protein-tests-"))
_SCRATCH_OWNER = os.getpid()


@atexit.register
def _remove_session_scratch() -> None:
    if os.getpid() == _SCRATCH_OWNER:  # never from a forked child that exits through atexit
        shutil.rmtree(SESSION_SCRATCH, ignore_errors=True)


if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = str(SESSION_SCRATCH / "prefect-home")
if "PROTEIN_CACHE_DIR" not in os.environ:
    os.environ["PROTEIN_CACHE_DIR"] = str(SESSION_SCRATCH / "cache")
for _folder in ("PREFECT_HOME", "PROTEIN_CACHE_DIR"):
    Path(os.environ[_folder]).mkdir(parents=True, exist_ok=True)
# What the code under test puts in the temp folder, in this process and in every process it starts
# (a `protein validate` without --report keeps its report there by design, a SIGKILLed training
# leaves its weights folder): the session's, so nothing outlives the session. Pytest's own
# tmp_path root stays the system's, where a failed test's folder is kept for a look.
# Modes as the system's /tmp: PostgreSQL runs as an unprivileged user (deployments/ha_stack/postgres.py) in it.
SESSION_TEMP = SESSION_SCRATCH / "tmp"
SESSION_TEMP.mkdir()
SESSION_SCRATCH.chmod(0o711)
SESSION_TEMP.chmod(0o1777)
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
os.environ["TMPDIR"] = tempfile.tempdir = str(SESSION_TEMP)


def torch_threads_per_worker(cpus: int, workers: int) -> int:
    """An equal share of the cores for each xdist worker's torch (and the processes it starts). Two
    workers of two intra-op threads each on two cores spun against each other: the fast tier took
    as long on two workers as on one; with one thread each, make check takes 2 min 26 s here."""
    return max(1, cpus // max(1, workers))


# Read by torch when it loads, so before any test imports it; an OMP_NUM_THREADS the user set is kept.
USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")
if (_workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT")) and USER_OMP_NUM_THREADS is None:
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = str(torch_threads_per_worker(os.cpu_count() or 1, int(_workers)))

SERVER_START_TIMEOUT_S = 10.0


# The tiers, the shared fixtures' units of work and the order of a session: tests/tiers.py.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(idle_worker.OPTION, action="store_true", dest="fill_idle",
                     help="with -n N (N >= 2) and --dist loadscope: the last worker runs only fast-tier tests, "
                          "each started when a core is idle while slow tests remain (tests/idle_worker.py)")
    parser.addoption(DURATIONS_OPTION, dest="record_durations", metavar="PATH", default=None,
                     help="write each module's seconds to PATH when the session passes (make durations: "
                          "the table make test orders its units of work by, tests/durations.json)")


def pytest_configure(config: pytest.Config) -> None:
    # Each shared fixture is stopped once its last module ends, not at the session's (tests/early_release.py).
    config.pluginmanager.register(EarlyRelease(SHARED_FIXTURE_MODULES), EarlyRelease.NAME)
    if config.getoption("record_durations") and not is_xdist_worker(config):
        config.pluginmanager.register(DurationRecorder(Path(config.getoption("record_durations"))),
                                      DurationRecorder.NAME)
    if config.getoption("fill_idle"):  # the idle-time worker (tests/idle_worker.py)
        if not is_xdist_worker(config) and idle_worker.enabled(config, config.getoption("numprocesses") or 0):
            idle_worker.announce(config, SESSION_SCRATCH / "slow-tier-done")
        config.pluginmanager.register(idle_worker.Plugin(config), idle_worker.Plugin.NAME)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    return shared_fixture_scheduler(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mark_slow_and_order(config, items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if is_xdist_worker(session.config):  # the controller checked (pytest_sessionstart)
        return
    if session.config.option.collectonly or not any(item.get_closest_marker("slow") for item in session.items):
        return
    refuse_a_disk_too_small_for_the_slow_tier(str(SESSION_SCRATCH.parent))  # the temp folder the user set


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    # An xdist controller collects nothing (its workers do, and one stopping there crashes the run
    # with an internal error), so it decides from the -m expression, before it starts its workers.
    config = session.config
    if (config.getoption("numprocesses", None) and not is_xdist_worker(config) and not config.option.collectonly
            and "not slow" not in (config.getoption("markexpr") or "")):
        refuse_a_disk_too_small_for_the_slow_tier(str(SESSION_SCRATCH.parent))


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """The test body trains or infers on one intra-op torch thread (tests.helpers.one_torch_thread)."""
    from tests.helpers import one_torch_thread

    with one_torch_thread():
        yield


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago. Another process can take it
    before it is used: servers that can pick their own port should (port 0, read back), and a port
    that must stay closed is held with `closed_port()`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def holding_a_closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens for as long as the block runs: the socket is bound
    (no other process can take the port) but never listens, so a connection is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 where nothing listens for the whole test (see holding_a_closed_port)."""
    with holding_a_closed_port() as port:
        yield port


class ProteinProcess:
    """The project in a fresh interpreter: the real `protein` entry point as users run it, or a
    module or script that imports the project (torch and Prefect imports alone take seconds). The
    fast tier starts none: every such process goes through the `protein_process` fixture, which
    marks its test slow, and the fast tier's guard (`no_fresh_interpreter_in_the_fast_tier`) refuses
    one started any other way."""

    def run(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.module("protein.cli", *args, env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)

    def module(self, module: str, *args: str, env: dict[str, str], cwd: Path | None = None,
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
        """`python -m module args` with exactly `env` (callers that want the test's variables pass them)."""
        return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)

    def popen(self, *args: str, env: dict[str, str], module: str = "protein.cli") -> subprocess.Popen[str]:
        """The entry point (or `python -m module`) started in a session of its own: `kill_group` ends it
        and every process it started (torchrun's ranks, a flow module's Prefect server), whatever the
        test's outcome."""
        return subprocess.Popen([sys.executable, "-m", module, *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)

    @staticmethod
    def kill_group(process: subprocess.Popen[Any]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate()

    def python(self, code: str, *args: str, env: dict[str, str] | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.script(code, *args, env={**os.environ, **(env or {})}, timeout=timeout)

    def script(self, code: str, *args: str, env: dict[str, str], cwd: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`python -c code args` with exactly `env`."""
        return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                              cwd=cwd, timeout=timeout)

    def start_script(self, code: str, *args: str) -> subprocess.Popen[bytes]:
        """`python -c code args` started and left running (with the test's environment and output), for a
        test that kills it."""
        return subprocess.Popen([sys.executable, "-c", code, *args])


@pytest.fixture(scope="session")
def protein_process() -> ProteinProcess:
    return ProteinProcess()


class FreshInterpreterInTheFastTier(RuntimeError):
    """A fast-tier test started this interpreter again, which the fast tier's definition rules out."""


def starts_this_interpreter(args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether `subprocess.Popen(args, **kwargs)` runs `sys.executable` (by its path, a link to it, or
    a name PATH resolves to it). A shell command line is not parsed: tests here pass argument lists."""
    if kwargs.get("shell"):
        return False
    program = kwargs.get("executable")
    if program is None:
        program = args if isinstance(args, (str, bytes, os.PathLike)) else next(iter(args), None)
    if program is None:
        return False
    program = os.fsdecode(program)
    found = program if os.sep in program else shutil.which(program)
    return found is not None and os.path.realpath(found) == os.path.realpath(sys.executable)


@pytest.fixture(autouse=True)
def no_fresh_interpreter_in_the_fast_tier(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a test the hook left unmarked (the fast tier), starting `sys.executable` raises: such a test
    belongs in the slow tier, through `protein_process`, and would otherwise slip into `make check`
    unseen. Other programs (moto_server, git) start as usual."""
    if request.node.get_closest_marker("slow") is not None:
        return
    unguarded = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if starts_this_interpreter(args, kwargs):
            raise FreshInterpreterInTheFastTier(
                f"{request.node.nodeid} starts {sys.executable} (args {args!r}): a fresh interpreter per "
                "case is the slow tier's; start it through the protein_process fixture")
        unguarded(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@dataclass(frozen=True)
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def protein_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """`protein.cli.main(argv)` in this process (torch and Prefect imported once, not per call), with
    stdout, stderr and the exit code as the real entry point would give them (argparse exits by SystemExit)."""

    def run(*args: str) -> CliResult:
        capsys.readouterr()  # what earlier calls or fixtures printed is not this call's output
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    from protein.cli import main

    return run


@pytest.fixture(scope="session")
def trainer() -> Callable[..., dict[str, Any]]:
    """`train_and_register`, the way tests train for whole epochs (requesting it marks a test slow)."""
    from protein.pipeline import train_and_register

    return train_and_register


class MotoServer:
    """A `moto_server` subprocess: a real S3 endpoint over HTTP, state kept in its memory."""

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None) -> None:
        # 0: the server binds a port the OS picks and start() reads it back from its log, so no other
        # process can take the port between choosing and binding it. A restart keeps it.
        self.port = port or 0
        self._env = env or {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)  # noqa: SIM115

    def start(self) -> None:
        moto_server = Path(sys.executable).parent / "moto_server"
        # Output goes to a file, not a pipe nobody reads, which would fill and block the server.
        log_start = Path(self._log.name).stat().st_size
        self._process = subprocess.Popen(
            [str(moto_server), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self._env},
        )
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._process.returncode}: {self.log_tail()}")
            if not self.port:
                bound = re.search(r"Running on http://127\.0\.0\.1:(\d+)",
                                  Path(self._log.name).read_text(errors="replace")[log_start:])
                if bound is None:
                    time.sleep(0.05)
                    continue
                self.port = int(bound.group(1))
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=0.5).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {SERVER_START_TIMEOUT_S}s: {self.log_tail()}")

    @property
    def endpoint(self) -> str:
        assert self.port, "start() the server first: it has no port before"
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=5)
        self._process = None

    def restart(self) -> None:
        """Stop and start on the same port; everything stored in the server is lost."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)

    def log_tail(self, chars: int = 2000) -> str:
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")[-chars:]


@contextmanager
def running_moto_server(env: dict[str, str] | None = None) -> Iterator[MotoServer]:
    """A started MotoServer (``env``: moto's settings, e.g. INITIAL_NO_AUTH_ACTION_COUNT), closed
    (stopped, log removed) on the way out."""
    server = MotoServer(env=env)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    with running_moto_server() as server:
        yield server


def set_s3_env(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, access_key: str = "testing", secret_key: str = "testing"
) -> None:
    """Point boto3's standard chain at ``endpoint`` and nothing else (no profile, config file or IMDS)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # The developer's own AWS setup must not leak into tests.
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def s3_env(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    set_s3_env(monkeypatch, s3_server.endpoint)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: MotoServer) -> str:
    """A fresh, empty bucket on the test server, as a store URI ``s3://<bucket>/prefix``."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/prefix"
