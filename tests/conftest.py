"""Shared fixtures. Keep this generic: a fixture belongs here only when several test folders use it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# Before any test imports Prefect or Great Expectations: no telemetry, and no writes to ~/.prefect.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
if "PREFECT_HOME" not in os.environ:
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="protein-prefect-home-")
# Nor to the user's own cache folder (protein.locations.default_cache_dir).
if "PROTEIN_CACHE_DIR" not in os.environ:
    os.environ["PROTEIN_CACHE_DIR"] = tempfile.mkdtemp(prefix="protein-cache-")

SERVER_START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MotoServer:
    """A `moto_server` subprocess: a real S3 endpoint over HTTP, state kept in its memory."""

    def __init__(self, port: int | None = None, env: dict[str, str] | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._env = env or {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="moto-server-", suffix=".log", delete=False)  # noqa: SIM115

    def start(self) -> None:
        moto_server = Path(sys.executable).parent / "moto_server"
        # Output goes to a file, not a pipe nobody reads, which would fill and block the server.
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
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=0.5).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means it is serving
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"moto_server did not answer within {SERVER_START_TIMEOUT_S}s: {self.log_tail()}")

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
def running_moto_server() -> Iterator[MotoServer]:
    """A started MotoServer, closed (stopped, log removed) on the way out."""
    server = MotoServer()
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
