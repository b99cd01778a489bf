"""The pieces of deployments/ha_stack/ that the end-to-end tests take for granted: ports held
by retrying, PostgreSQL as an unprivileged user on loopback only, nginx's balancing settings."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from deployments import ha_stack
from deployments.ha_stack import cli, daemons

pytestmark = [pytest.mark.integration]


def test_a_port_taken_between_pick_and_bind_is_retried_on_another(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])  # the first pick is the port another process holds by now
        real_free_port = daemons.free_port
        monkeypatch.setattr(daemons, "free_port", lambda: next(picks, None) or real_free_port())
        redis = ha_stack.start_redis(tmp_path)
        try:
            assert redis.alive() and redis.port != busy
            assert "Address already in use" in redis.log(), redis.log_tail()
        finally:
            redis.stop()
    assert not redis.alive()


def test_postgres_runs_unprivileged_with_a_password_on_loopback_only() -> None:
    with ha_stack.running_postgres() as pg:
        assert pg.daemon is not None
        server_pids = [int(p) for p in os.listdir("/proc") if p.isdigit()
                       and _parent(int(p)) == pg.daemon.process.pid]
        owners = {os.stat(f"/proc/{pid}").st_uid for pid in server_pids} or {os.stat(
            f"/proc/{pg.daemon.process.pid}").st_uid}
        if os.geteuid() == 0:
            assert 0 not in owners, "PostgreSQL runs as root"
        assert pg.psql("SHOW listen_addresses").strip() == "127.0.0.1"
        assert pg.psql("SELECT 1").strip() == "1"
        pg.password = "wrong"
        with pytest.raises(ha_stack.StartError, match="password authentication failed"):
            pg.psql("SELECT 1")
    assert not pg.root.exists(), "the cluster's folder is removed"


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_nginx_balances_with_passive_checks_and_passes_websockets(tmp_path: Path) -> None:
    config = ha_stack.nginx_config(tmp_path, 8080, [4201, 4202], tmp_path / "temp")
    assert "listen 127.0.0.1:8080;" in config
    assert "server 127.0.0.1:4201 max_fails=1 fail_timeout=10s;" in config
    assert "server 127.0.0.1:4202 max_fails=1 fail_timeout=10s;" in config
    assert "proxy_next_upstream error timeout http_502 http_503;" in config
    assert "proxy_set_header Upgrade $http_upgrade;" in config
    assert "proxy_set_header Connection $connection_upgrade;" in config
    # Connections to the APIs are reused: HTTP/1.1, no "Connection: close" for plain requests.
    assert "proxy_http_version 1.1;" in config
    assert "map $http_upgrade $connection_upgrade { default upgrade; '' ''; }" in config
    assert f"keepalive {ha_stack.UPSTREAM_KEEPALIVE};" in config


def closed_connections_to(ports: set[int]) -> set[tuple[str, str]]:
    """Connections to the servers on ``ports`` closed in the last minute (TIME_WAIT, on whichever
    side closed first), by their two addresses."""
    closed = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if state == "06" and {int(local.split(":")[1], 16), int(remote.split(":")[1], 16)} & ports:
            closed.add(tuple(sorted((local, remote))))
    return closed


def test_requests_through_nginx_reuse_its_connections_to_the_apis(ha_prefect: ha_stack.HAPrefect) -> None:
    """A new connection for every request cost an API ~0.6 ms of CPU on a ~5 ms read: nginx keeps
    its connections to the APIs open (HTTP/1.1, no "Connection: close", `keepalive`)."""
    import httpx

    ports = {api.port for api in ha_prefect.apis}
    before = closed_connections_to(ports)
    with httpx.Client(base_url=ha_prefect.api_url, timeout=10) as client:
        for _ in range(40):
            assert client.get("/health").status_code == 200
    # Without the keepalive: 40, a connection per request.
    assert len(closed_connections_to(ports) - before) < 5


def test_the_apis_start_side_by_side_on_a_copy_of_a_template_that_holds_the_block_types(
        ha_postgres: ha_stack.Postgres, tmp_path: Path) -> None:
    """Every API process registers Prefect's block types as it starts unless told not to, and two
    doing it together on a new database collide (uq_block_type__slug): the template has them, so
    the APIs start with registration off and at once."""
    from tests.integration.prefect_services import prefect_env

    env = prefect_env(tmp_path / "home")
    ha_postgres.prefect_database("protein_block_types_check", env)
    slugs = set(ha_postgres.psql("SELECT slug FROM block_type", database="protein_block_types_check").split())
    assert {"webhook", "secret", "slack-webhook"} <= slugs, slugs
    stack = ha_stack.start_ha_prefect(tmp_path / "stack", ha_postgres, env, api_count=3)
    try:
        assert all(api.alive() and api.ready_at is not None for api in stack.apis)
        # Each started before any answered: none waited for another.
        assert max(api.started_at for api in stack.apis) < min(api.ready_at or 0.0 for api in stack.apis)
        for api in stack.apis:
            response = urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{api.port}/api/block_types/filter", data=b"{}", method="POST",
                headers={"Content-Type": "application/json"}), timeout=10)
            assert {t["slug"] for t in json.load(response)} == slugs
        # Nor did any hash the block registry (importing every installed Prefect collection to do
        # it) only to skip the registration: that writes the hash to PREFECT_HOME's memo store.
        memo = Path(env["PREFECT_HOME"]) / "memo_store.toml"
        assert not memo.exists(), f"an API hashed the block registry at start: {memo.read_text()}"
    finally:
        ha_stack.stop_ha_prefect(stack)


def test_a_cluster_restores_the_runs_template_instead_of_migrating_again(
        ha_postgres: ha_stack.Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's first cluster migrates Prefect's template (~7 s, ~6 CPU-s) and dumps it; the
    others restore the dump: the same schema, migration version, extensions and block types."""
    from tests.integration.prefect_services import prefect_env

    env = prefect_env(tmp_path / "home")
    ha_postgres.prefect_database("protein_template_reference", env)
    assert ha_postgres.template_cache is not None
    assert list(ha_postgres.template_cache.glob("prefect-template-*.dump"))

    def migrating(self: ha_stack.Postgres, env: object) -> None:
        raise AssertionError("migrated although the run's template dump exists")

    monkeypatch.setattr(ha_stack.Postgres, "migrate_template", migrating)

    def described(pg: ha_stack.Postgres, database: str) -> list[str]:
        return [pg.psql(sql, database=database) for sql in (
            "SELECT table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY 1, 2",
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1",
            "SELECT extname FROM pg_extension ORDER BY 1", "SELECT version_num FROM alembic_version",
            "SELECT slug FROM block_type ORDER BY 1")]

    with ha_stack.running_postgres(template_cache=ha_postgres.template_cache) as pg:
        pg.prefect_database("protein_template_copy", env)
        copy = described(pg, "protein_template_copy")
    assert copy == described(ha_postgres, "protein_template_reference")
    assert "webhook" in copy[-1].split() and copy[3].strip()


def test_an_event_an_api_accepted_survives_the_api_being_killed(ha_prefect: ha_stack.HAPrefect) -> None:
    """Task-run states reach the server only as events. An event an API has accepted must be in
    Redis before the API can be lost: a flow run that has moved on, or ended, never sends it
    again. Prefect's default held it in the API's memory for up to 10 s (the soak's run-summary
    task run stayed Pending under a completed retrain when the API was killed then)."""
    import asyncio
    import secrets

    import httpx
    from prefect.events import Event
    from prefect.events.clients import PrefectEventsClient

    stack = ha_prefect
    doomed = stack.apis[0]
    resource = f"protein.test.{secrets.token_hex(4)}"

    async def emit_then_kill_the_api() -> None:
        # Straight to one API (not nginx) so the test knows which one to kill. The connection
        # opens here, so the API's periodic flush (10 s after it) cannot be what saves the event.
        events = PrefectEventsClient(api_url=f"http://127.0.0.1:{doomed.port}/api")
        await events.__aenter__()
        await events.emit(Event(event="protein.test.accepted", resource={"prefect.resource.id": resource}))
        await asyncio.sleep(2.0)  # the API has read it; its process ends with no goodbye
        stack.kill_api(0)
        # The client leaves as a finished flow-run process does: closing resends nothing.
        with contextlib.suppress(Exception):  # closing a socket whose server is gone
            await events.__aexit__(None, None, None)

    asyncio.run(emit_then_kill_the_api())
    assert not doomed.alive()
    [survivor] = stack.apis
    body = {"filter": {"event": {"name": ["protein.test.accepted"]},
                       "any_resource": {"id": [resource]}}, "limit": 5}
    deadline = time.monotonic() + 30
    while True:
        response = httpx.post(f"http://127.0.0.1:{survivor.port}/api/events/filter", json=body, timeout=10)
        response.raise_for_status()
        if response.json()["events"]:
            break
        assert time.monotonic() < deadline, f"the event the killed API had accepted was lost\n{stack.logs()[-3000:]}"
        time.sleep(0.5)
    stack.replace_killed_apis()  # the module's stack as the next test expects it: two APIs


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def test_events_wait_in_redis_for_a_services_process_that_is_down(ha_prefect: ha_stack.HAPrefect,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each API trims the event stream to what every consumer group has read, leaving out a group
    whose consumers have all been idle past a threshold (Prefect's default 5 minutes): a services
    process down longer came back to a stream cut past its position, and the events of the outage
    (task-run states, push triggers, alerts) were gone. The stack's processes run with a day's
    threshold; under it an idle group still holds the stream, under a threshold it has outlived it
    does not (the control: the same trim, the same stream, a 1 s threshold)."""
    import asyncio
    import secrets

    from prefect_redis.messaging import RedisMessagingConsumerSettings, _trim_stream_to_lowest_delivered_id
    from redis import Redis

    stack = ha_prefect
    settings = ha_stack.redis_settings("127.0.0.1", stack.redis.port)
    for daemon in (*stack.apis, stack.services):
        env = process_env(daemon.process.pid)
        for name in ("PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD",
                     "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE", "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL"):
            assert env.get(name) == settings[name], (daemon.name, name)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    assert RedisMessagingConsumerSettings().trim_idle_threshold.total_seconds() == 24 * 3600

    redis = Redis(host="127.0.0.1", port=stack.redis.port)
    stream = f"protein-test-{secrets.token_hex(4)}"
    ids = [redis.xadd(stream, {"n": str(n)}).decode() for n in range(5)]
    redis.xgroup_create(stream, "persister", id="0")
    redis.xreadgroup("persister", "services-1", {stream: ">"}, count=1)  # read the first, then went down
    time.sleep(2.5)

    def trim() -> int:
        asyncio.run(_trim_stream_to_lowest_delivered_id(stream, latest_delivered_id=ids[-1]))
        return int(redis.xlen(stream))

    try:
        assert trim() == 5, "the stream was cut past what the silent services process had read"
        monkeypatch.setenv("PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD", "1")
        assert trim() == 1  # the control: a group idle past the threshold no longer holds the stream
    finally:
        redis.delete(stream)


def test_the_workers_clean_up_messages_live_in_redis_for_every_server_process(
        ha_prefect: ha_stack.HAPrefect, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefect keeps the "stop this run's process" messages its services process queues in that
    process's memory by default, where the APIs that workers ask never see them."""
    import importlib

    from prefect.settings import Settings
    from prefect_redis import cleanup_queue

    for name, value in ha_stack.redis_settings("127.0.0.1", ha_prefect.redis.port).items():
        monkeypatch.setenv(name, value)
    storage = importlib.import_module(Settings().server.worker_channel.cleanup_queue_storage)
    assert storage.WorkerCleanupQueue is cleanup_queue.WorkerCleanupQueue  # not the in-memory default
    assert cleanup_queue.RedisWorkerCleanupQueueSettings().url == f"redis://127.0.0.1:{ha_prefect.redis.port}/0"


def test_register_block_types_is_the_operators_one_off_step_and_refuses_what_it_cannot_do(
        ha_postgres: ha_stack.Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """docs/runbook.md step 3: on a database migrated but without block types, the command registers
    them; a database it cannot reach is one line and exit 1 (no traceback, no password); no database
    named, or an unknown argument, one line and exit 2."""
    from tests.integration.prefect_services import prefect_env

    migrated = "protein_migrated_only"
    ha_postgres.psql(f"CREATE DATABASE {migrated}")
    env = prefect_env(tmp_path / "home")
    for name, value in {**env, "PREFECT_API_DATABASE_CONNECTION_URL": ha_postgres.url(migrated)}.items():
        monkeypatch.setenv(name, value)
    upgraded = subprocess.run([str(ha_stack.PREFECT), "server", "database", "upgrade", "-y"], capture_output=True,
                              text=True, timeout=600)
    assert upgraded.returncode == 0, upgraded.stderr[-2000:]
    assert ha_postgres.psql("SELECT count(*) FROM block_type", database=migrated).strip() == "0"
    assert cli.main(["register-block-types"]) == 0
    assert "webhook" in ha_postgres.psql("SELECT slug FROM block_type", database=migrated).split()

    capsys.readouterr()
    with socket.socket() as closed:  # bound and never listening: nothing answers there
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL",
                           f"postgresql+asyncpg://prefect:hunter2-secret@127.0.0.1:{closed.getsockname()[1]}/prefect")
        assert cli.main(["register-block-types"]) == 1
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("registering Prefect's block types in PREFECT_API_DATABASE_CONNECTION_URL's database "
                           "failed: "), line
    assert "hunter2-secret" not in line and "Traceback" not in line

    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL")
    assert cli.main(["register-block-types"]) == 2
    assert cli.main(["register-blocks"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("PREFECT_API_DATABASE_CONNECTION_URL is not set")
    assert lines[1].startswith("usage: python -m deployments.ha_stack")
