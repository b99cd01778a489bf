"""Flow modules run from a shell: where they find the Prefect API, and what the user sees.

Prefect's default for a process without PREFECT_API_URL is a temporary server that the first
flow call starts and then waits 20 s for. In a brand-new PREFECT_HOME that first start also
creates and migrates the database, which on a loaded 2-core machine takes longer than those
20 s: the very first `make run` failed with a 40-line traceback (3 of 3 tries in a new
PREFECT_HOME; once with "database is locked"), while a second run in the same folder worked.

So a local entry point does not leave the start to the first flow call. It starts a real
`prefect server start` on a free loopback port for the duration of the command and waits for
its health endpoint with its own bounded, generous timeout (migrations included, measured at
~20 s on a loaded 2-core machine, so the default leaves a wide margin). That is the same server
production runs, with its log kept in PREFECT_HOME, and its UI can be watched while the command
runs. With PREFECT_API_URL set, the API is checked once up front instead. Either way a failure
is one line that says what failed and what to do, never a traceback.

SIGTERM (`kill PID`, `timeout`, a service manager stopping only the main process) ends the command
like Ctrl-C does: through the code that stops that server. Python's default for SIGTERM ends the
process at once, and the server child went on listening on its port and holding PREFECT_HOME's
database, which the next command's server shares.
"""

from __future__ import annotations

import http.client
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from protein.storage.s3_clients import redacted_uri

# A documented exit code of its own: the protein CLI uses 1-5 and 7-12 (protein.errors).
EXIT_PREFECT_UNAVAILABLE = 6
# What a shell reports for a process a signal ended (128 + the signal), as Ctrl-C's 130 is.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM
DEFAULT_STARTUP_TIMEOUT_S = 300.0
STARTUP_TIMEOUT_ENV = "PROTEIN_PREFECT_STARTUP_TIMEOUT_S"
SERVER_LOG_NAME = "local-server.log"


class PrefectUnavailable(Exception):
    """The Prefect API could not be started or reached; the message says what to do."""

    exit_code = EXIT_PREFECT_UNAVAILABLE


class Terminated(BaseException):
    """SIGTERM reached the command. A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` on the way out takes it for an error of the work."""


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread for the duration of the block, so the blocks it
    unwinds (the local server's stop) run.

    During a flow run Prefect's engine puts its own handler in place (capture_sigterm): it marks the
    run Crashed, puts back the handler it replaced, this one, and sends the signal again, which
    raises Terminated from there. Only the first SIGTERM raises: a second one while the server is
    being stopped would cut that stop short."""
    received = False

    def on_sigterm(signum: int, frame: object) -> None:
        nonlocal received
        if not received:
            received = True
            raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread, where only Python can handle signals: left as it is
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME", Path.home() / ".prefect")).expanduser()


def free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def api_tls_context(api_url: str) -> ssl.SSLContext | None:
    """The TLS settings Prefect's own client uses for this API (PREFECT_API_SSL_CERT_FILE, a
    private CA's bundle; PREFECT_API_TLS_INSECURE_SKIP_VERIFY): the health check used the system's
    CA store only, and a server behind a private CA, which Prefect's client reached, was "not
    reachable" (exit 6) to every flow's command line."""
    if not api_url.startswith("https://"):
        return None
    from prefect.settings import get_current_settings

    settings = get_current_settings().api
    if settings.tls_insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=settings.ssl_cert_file or None)


def api_health(api_url: str, timeout_s: float = 5.0) -> str | None:
    """None when the API answers its health check, else why not (one line)."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout_s,
                                    context=api_tls_context(api_url)) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return str(reason) or type(exc).__name__
    except (http.client.InvalidURL, ValueError):  # its message quotes the URL, password included
        return "not a valid URL"


def startup_timeout_s() -> float:
    raw = os.environ.get(STARTUP_TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise PrefectUnavailable(f"{STARTUP_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


# Where a server keeps its state and talks to its peers: settings an operator exports to run the
# production stack's `prefect server database upgrade` or its services. A local server given them
# would migrate the production database, run a second scheduler and automations on it, and join the
# production Redis consumer groups.
SERVER_STATE_SETTINGS = ("PREFECT_API_DATABASE_", "PREFECT_SERVER_DATABASE_", "PREFECT_MESSAGING_",
                         "PREFECT_REDIS_", "PREFECT_SERVER_DOCKET_", "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING",
                         "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE")


def local_server_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` for the demo's own local server: no API URL of another server, and none of the
    settings that would point it at another server's database, broker or credential."""
    return {k: v for k, v in base.items() if k != "PREFECT_API_URL" and not k.startswith(SERVER_STATE_SETTINGS)}


class LocalServer:
    """`prefect server start` on 127.0.0.1 as a child process, stopped when the command ends."""

    def __init__(self, home: Path, timeout_s: float, port: int | None = None) -> None:
        self.home = home
        self.timeout_s = timeout_s
        self.port = port or free_loopback_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / SERVER_LOG_NAME
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, on_wait: Callable[[float], None] | None = None) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {**local_server_env(os.environ), "PREFECT_HOME": str(self.home), "PREFECT_UI_API_URL": self.api_url,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
        started = time.monotonic()
        last_reason = "no answer yet"
        while (elapsed := time.monotonic() - started) < self.timeout_s:
            code = self._process.poll()
            if code is not None:
                raise PrefectUnavailable(
                    f"the local Prefect server exited with code {code} while starting (log: {self.log_path}); "
                    "set PREFECT_API_URL to a running server to use that one instead")
            reason = api_health(self.api_url, timeout_s=2.0)
            if reason is None:
                return
            last_reason = reason
            if on_wait is not None:
                on_wait(elapsed)
            time.sleep(0.5)
        self.stop()
        raise PrefectUnavailable(
            f"the local Prefect server did not answer at {self.api_url} within {self.timeout_s:.0f} s "
            f"({last_reason}; log: {self.log_path}); raise {STARTUP_TIMEOUT_ENV} on a slow machine, or set "
            "PREFECT_API_URL to a running server (`prefect server start`)")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # The server shuts down on SIGTERM but may take a few seconds to drain its services.
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def prefect_api(announce: Callable[[str], None] | None = None, local_only: bool = False) -> Iterator[str]:
    """The Prefect API URL to run flows against for the duration of the block.

    PREFECT_API_URL set: that server, checked first. Unset, or ``local_only``: a local server started
    here (the demo's: run from a shell set up for production, it sent its synthetic retrains to the
    production server, whose promotion alert announced a demo champion)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = None if local_only else os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        reason = api_health(configured)
        if reason is not None:
            raise PrefectUnavailable(
                f"the Prefect API at {redacted_uri(configured)} (PREFECT_API_URL) is not reachable ({reason}); "
                "start it (`prefect server start`) or unset PREFECT_API_URL to run against a temporary local server")
        if announce:
            announce(f"using the server at {redacted_uri(configured)} (PREFECT_API_URL)")
        yield configured
        return

    server = LocalServer(prefect_home(), startup_timeout_s())
    if announce:
        announce(f"starting a local Prefect server (UI {server.ui_url} while this runs; log {server.log_path})")
    try:
        started = time.monotonic()
        server.start()
        if announce:
            announce(f"server ready in {time.monotonic() - started:.0f} s")
        # Children (pool workers, subprocesses) read the environment; this process reads settings.
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.api_url
        try:
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                try:
                    yield server.api_url
                finally:
                    send_pending_logs_and_events()
        finally:
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous
    finally:
        server.stop()


def send_pending_logs_and_events(timeout_s: float = 10.0) -> None:
    """Deliver buffered run logs and events before the server they go to is stopped; otherwise
    Prefect's background workers print connection errors after the command has finished."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, APILogHandler):
                handler.flush()
    try:
        EventsWorker.drain_all(timeout=timeout_s)
    except Exception as exc:  # best effort: never fail a finished command over telemetry of it
        logging.getLogger(__name__).debug("events not drained: %s", exc)


def api_error_line(exc: BaseException) -> str | None:
    """One line for an exception that means the API went away mid-run; None for anything else."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(exc, httpx.TransportError | PrefectHTTPStatusError):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return f"lost the Prefect API during the run ({type(exc).__name__}: {first})"
    if isinstance(exc, RuntimeError) and "Prefect API" in str(exc):
        return str(exc).splitlines()[0]
    return None


class WithoutTraceback(logging.Formatter):
    """Console records as Prefect formats them, minus tracebacks: the run's failure is reported
    as one line at the end, and the full traceback stays in the run's logs on the server (UI)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            # A copy: other handlers (the API's) must still see the exception.
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None,
                                            "stack_info": None})
        return self.inner.format(record)


def console_without_tracebacks() -> None:
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, WithoutTraceback):
            handler.setFormatter(WithoutTraceback(handler.formatter))


T = TypeVar("T")


def checked_params(command: str, build: Callable[[], T]) -> T | int:
    """The flow's parameters from a module's options, or exit 2 after one line when an option is
    out of its parameter's bounds: before any Prefect server starts, never a pydantic traceback."""
    from pydantic import ValidationError

    try:
        return build()
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(part) for part in first.get("loc", ())) or exc.title
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        print(f"{command}: error: {exc.title} {where}: {first.get('msg', 'invalid')}, got {first.get('input')!r}"
              f"{more}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bound across fields, checked by the library's config
        print(f"{command}: error: {exc}", file=sys.stderr)
        return 2


def run_with_prefect(command: str, run: Callable[[], int], announce: Callable[[str], None] | None = None,
                     local_only: bool = False) -> int:
    """Run `run` (which calls a flow and returns an exit code) against a reachable Prefect API
    (always a local one of its own with ``local_only``).

    The policy of the protein CLI: a failure is one line on stderr and a documented exit code."""
    console_without_tracebacks()
    try:
        with sigterm_raises_terminated(), prefect_api(announce, local_only):
            return run()
    except PrefectUnavailable as exc:
        print(f"{command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{command}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as exc:
        line = api_error_line(exc)
        if line is None:
            raise
        print(f"{command}: error: {line}; check the server (or its log in {prefect_home()})", file=sys.stderr)
        return EXIT_PREFECT_UNAVAILABLE
