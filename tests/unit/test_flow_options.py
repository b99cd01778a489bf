"""A flow module's option out of its parameter's bounds is one line and exit 2, before any Prefect
server starts (it was a pydantic traceback, exit 1, after the server came up)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.mark.parametrize(("module", "argv", "named"), [
    ("flows.validate", ["--image-size", "0"], "ValidationParams image_size: Input should be greater than or equal"),
    ("flows.retrain", ["--epochs", "0"], "TrainParams epochs: Input should be greater than or equal to 1, got 0"),
    ("flows.retrain", ["--batch-size", "2000"], "TrainParams batch_size: Input should be less than or equal"),
    ("flows.retrain", ["--seed", "-1"], "TrainParams seed: Input should be greater than or equal to 0"),
])
def test_an_option_out_of_bounds_is_one_line_before_any_server(module: str, argv: list[str], named: str,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import importlib

    import flows.cli

    def no_server(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a Prefect API was started for options that were refused")

    monkeypatch.setattr(flows.cli, "prefect_api", no_server)
    main = importlib.import_module(module).main
    assert main(["--data", "/nowhere", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"python -m {module}: error: {named}" in err, err


def test_train_settings_refused_by_the_config_fail_the_retrain_before_any_task() -> None:
    from prefect.states import State

    from flows.params import TrainParams
    from flows.retrain import retrain

    # Batch 10 in 3 micro-batches: the form's fields pass one by one, the config refuses them together.
    state = retrain.fn(data="/nowhere", store="/nowhere/store", train=TrainParams(batch_size=10, accumulate=3))
    assert isinstance(state, State) and state.is_failed()
    assert state.message.startswith("train settings: accumulate must be >= 1 and divide batch_size 10")
    # Batch 30 over 4 ranks: it failed on the GPU host after validation and dispatch, retried as a ValueError.
    state = retrain.fn(data="/nowhere", store="/nowhere/store", train=TrainParams(batch_size=30, nproc=4))
    assert isinstance(state, State) and state.is_failed()
    assert state.message.startswith("train settings: batch_size 30 (the global batch) must be a multiple of nproc x "
                                    "accumulate = 4 x 1"), state.message


def test_a_train_on_ranks_usage_error_is_not_retried(tmp_path) -> None:  # noqa: ANN001
    from protein.config import TrainConfig
    from protein.pipeline.training import train_on_ranks
    from tasks.retry import is_transient

    for nproc, config in ((0, TrainConfig()), (3, TrainConfig(batch_size=32, device="cpu"))):
        with pytest.raises(Exception) as raised:
            train_on_ranks(nproc, tmp_path, str(tmp_path / "store"), config, "r")
        assert not is_transient(raised.value), raised.value


def test_an_empty_text_field_takes_the_recipes_value_and_a_device_torch_cannot_name_is_refused() -> None:
    from flows.params import TrainParams
    from protein.config import RECIPES, TrainConfig, recipe_config

    # "empty: the recipe's", as the form says: it trained the winner recipe from scratch.
    assert RECIPES["winner"]["weights"] == "imagenet"
    assert TrainParams(recipe="winner", weights="").to_config().weights == "imagenet"
    assert recipe_config("winner", weights="  ", arch="").weights == "imagenet"
    # 'none' says from scratch, as --weights documents (it was read as a file named none).
    assert recipe_config("winner", weights="none").weights is None and TrainConfig(weights="None").weights is None
    for device in ("gpu7", "", "cuda:x"):
        with pytest.raises(ValueError, match="device must be auto, cpu, mps, cuda or cuda:N"):
            TrainConfig(device=device)


def test_the_demos_local_server_never_gets_another_servers_database_or_broker(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """An operator's shell that ran the production stack's `prefect server database upgrade` holds its
    database URL and Redis settings: the demo's local server started with them migrated the
    production database and ran a second scheduler and automations on it."""
    from flows.cli import local_server_env

    shell = {"PATH": "/usr/bin", "PREFECT_API_URL": "https://prefect.example/api",
             "PREFECT_API_DATABASE_CONNECTION_URL": "postgresql+asyncpg://prefect:pw@db/prefect",
             "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://prefect:pw@db/prefect",
             "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
             "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
             "PREFECT_REDIS_MESSAGING_HOST": "redis.example", "PREFECT_SERVER_DOCKET_URL": "redis://redis.example/1",
             "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
             "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
             "PREFECT_LOGGING_LEVEL": "INFO"}
    assert local_server_env(shell) == {"PATH": "/usr/bin", "PREFECT_LOGGING_LEVEL": "INFO"}

    # ... and the local server is started with that environment.
    import flows.cli

    started: list[dict[str, str]] = []

    def popen(*args: object, env: dict[str, str], **kwargs: object) -> None:
        started.append(env)
        raise OSError("not started in this test")

    for name, value in shell.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(flows.cli.subprocess, "Popen", popen)
    with pytest.raises(OSError, match="not started in this test"):
        flows.cli.LocalServer(tmp_path, 1.0).start()
    leaked = [k for k in started[0] if k == "PREFECT_API_URL"
              or k.startswith(("PREFECT_API_DATABASE", "PREFECT_REDIS", "PREFECT_MESSAGING"))]
    assert leaked == [], leaked


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself, and its key: a private CA's server."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "protein test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "ca.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_the_health_check_trusts_the_ca_prefects_client_is_given(tmp_path: Path) -> None:
    """A server behind a private CA: Prefect's client reached it with PREFECT_API_SSL_CERT_FILE, the
    command line's health check used the system store only and said 'not reachable' (exit 6)."""
    import http.server
    import ssl
    import threading

    from prefect.settings import PREFECT_API_SSL_CERT_FILE, temporary_settings

    from flows.cli import api_health

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the handler's name
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args: object) -> None:
            return None

    cert, key = self_signed(tmp_path)
    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/api"
    try:
        assert "CERTIFICATE_VERIFY_FAILED" in (api_health(url) or "")  # the system store does not know it
        with temporary_settings(updates={PREFECT_API_SSL_CERT_FILE: str(cert)}):
            assert api_health(url) is None
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("argv", "named"), [
    (["--epochs", "0"], "TrainParams epochs: Input should be greater than or equal to 1, got 0"),
    (["--image-size", "8"], "TrainParams image_size: Input should be greater than or equal to 16, got 8"),
])
def test_a_demo_option_out_of_bounds_is_one_line_before_anything_is_written_or_started(
        argv: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The demo copied its options into TrainParams unvalidated: a server started, the run failed, exit 1."""
    import flows.cli
    import flows.demo

    def no_server(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a Prefect API was started for options that were refused")

    monkeypatch.setattr(flows.cli, "prefect_api", no_server)
    work = tmp_path / "work"
    assert flows.demo.main(["--work", str(work), "--data", str(tmp_path / "data"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"python -m flows.demo: error: {named}" in err, err
    assert not work.exists()


def test_a_demo_whose_gate_refused_both_challengers_says_so_in_one_line(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """No champion after both runs (--epochs 1 under min_score, or --data on other data) read the
    registry for version None: a RegistryError traceback, exit 1."""
    from flows.demo import show_result

    refused = {"champion": None, "challenger": "v1", "promoted": False, "submission": None,
               "reasons": ["f1_samples 0.1200 is below the minimum 0.3000"]}
    results = [refused, {**refused, "challenger": "v2"}]
    summary = show_result(str(tmp_path / "store"), results, tmp_path / "data", tmp_path / "truth.csv")
    assert summary == {"runs": results}
    out = capsys.readouterr().out
    assert ("no champion: the gate refused both challengers (f1_samples 0.1200 is below the minimum 0.3000), so no "
            "submission was written; more --epochs train a model that can clear it\n") in out, out


def test_the_demo_starts_its_own_server_and_cache_whatever_the_shell_points_at(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`make run` in a shell set up for production (PREFECT_API_URL, PREFECT_HOME, a shared PROTEIN_CACHE_DIR) sent
    the demo's synthetic retrains to the production server, whose promotion alert announced a demo
    champion."""
    import flows.cli
    import flows.demo
    from protein.locations import CACHE_DIR_ENV

    production = "http://prefect.example.internal/api"
    monkeypatch.setenv("PREFECT_API_URL", production)
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "shared-cache"))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "production-home"))
    monkeypatch.setattr(flows.cli, "api_health", lambda url: pytest.fail(f"asked {url} for its health"))
    started: list[Path] = []

    class NotStarted(Exception):
        pass

    def start(server: flows.cli.LocalServer) -> None:
        started.append(server.home)
        raise NotStarted

    monkeypatch.setattr(flows.cli.LocalServer, "start", start)
    monkeypatch.setattr(flows.demo, "ensure_dataset", lambda work: (tmp_path / "data", None))
    work = tmp_path / "work"
    with pytest.raises(NotStarted):
        flows.demo.main(["--work", str(work)])
    assert started == [work.resolve() / "prefect"]
    assert os.environ[CACHE_DIR_ENV] == str(work.resolve() / "cache")
