"""The stack itself: two API processes and the services process on one database and one Redis,
behind nginx; started side by side on a copy of the migrated template, stopped in order."""

from __future__ import annotations

import secrets
import shutil
import signal
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from deployments.ha_stack.balancer import nginx_temp_root, route_to, start_nginx
from deployments.ha_stack.daemons import PREFECT, Daemon, StartError, http_ok, start_listening
from deployments.ha_stack.postgres import Postgres
from deployments.ha_stack.redis_server import redis_settings, start_redis


@dataclass
class HAPrefect:
    """Two API processes and the services process on one database and one Redis, behind nginx."""

    root: Path
    server_env: dict[str, str]
    redis: Daemon
    apis: list[Daemon]
    services: Daemon
    nginx: Daemon
    nginx_temp: Path
    ui: bool = False
    killed: list[Daemon] = field(default_factory=list)  # API processes a failover test killed

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.nginx.port}"

    def daemons(self) -> list[Daemon]:
        return [self.nginx, *self.apis, self.services, self.redis]

    def client_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` for a client of this stack (worker, CLI, deploy): the API is nginx, and no
        database setting (a client never talks to the database)."""
        env = {k: v for k, v in base.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}
        # While PostgreSQL refuses connections (a restart, a failover) the APIs answer 500, not
        # 503: Prefect 3.9 maps only DBAPI errors to 503, and a refused connect is an OSError.
        # Clients retry 500 too (5 times, 2..32 s apart), or a flow run crashes on its next
        # state change (tests/integration/test_ha_failover.py).
        return {**env, "PREFECT_API_URL": self.api_url, "PREFECT_UI_URL": self.ui_url,
                "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500"}

    def logs(self) -> str:
        return "\n".join(d.log_tail() for d in [*self.daemons(), *self.killed])

    def kill_api(self, index: int) -> Daemon:
        """SIGKILL one API process (a host lost at once); nginx keeps it listed and finds it down."""
        api = self.apis.pop(index)
        api.stop(signal.SIGKILL)
        self.killed.append(api)
        return api

    def replace_killed_apis(self) -> None:
        """Start a new API process for each killed one and route nginx to the live ones."""
        for _ in range(len(self.killed)):
            self.apis.append(start_api(self.root, self.server_env, len(self.apis) + len(self.killed) + 1, self.ui))
        self.killed.clear()
        route_to(self.nginx, self.root, [api.port for api in self.apis], self.nginx_temp)

    def upstream_ports_used(self) -> set[int]:
        """The API ports nginx sent requests to, from its access log."""
        log = self.root / "nginx-access.log"
        used = set()
        for line in log.read_text().splitlines() if log.exists() else []:
            for addr in line.split(" ", 1)[0].split(","):
                host, _, port = addr.strip().rpartition(":")
                if host and port.isdigit():
                    used.add(int(port))
        return used


def start_api(root: Path, env: Mapping[str, str], index: int, ui: bool) -> Daemon:
    def launch(port: int) -> Daemon:
        return Daemon(f"prefect-api-{index}", [
            str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-services",
            *([] if ui else ["--no-ui"])], root, env={**env, "PREFECT_SERVER_API_PORT": str(port)}, port=port)

    return start_listening(f"prefect API {index}", launch, lambda port: http_ok(f"http://127.0.0.1:{port}/api/health"))


# Flow runs (with their task runs, logs and artifacts) kept this long after they end. Prefect's
# default deletes old events only: every night's retrain, its children and their artifacts stayed
# in the database for good, growing it, its nightly dump and the UI's run lists for as long as the
# pipeline ran. Nothing in the pipeline reads a run this old (push order, champions and gate records
# live in the store).
RUN_HISTORY_KEPT_DAYS = 90


def run_history_retention(days: int = RUN_HISTORY_KEPT_DAYS) -> dict[str, str]:
    """The settings of the services process (and, harmlessly, the APIs) that have Prefect's database
    vacuum delete finished top-level flow runs ``days`` after they end, children and all, besides
    old events (its default); orphaned logs and artifacts are swept daily with them."""
    return {"PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "events,flow_runs",
            "PREFECT_SERVER_SERVICES_DB_VACUUM_RETENTION_PERIOD": str(days * 24 * 3600)}


def server_env(base_env: Mapping[str, str], database_url: str, redis_port: int, scheduler: bool) -> dict[str, str]:
    """What every server process of the stack (APIs and services) runs with: ``base_env`` less the
    client's PREFECT_API_URL, plus the database, the start-up, retention and Redis settings."""
    env = {k: v for k, v in base_env.items() if k != "PREFECT_API_URL"}
    env.update({
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        # Migrations and block types went into the template once, before any server; several
        # servers doing either as they start would race.
        "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",
        "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
        # And not hashed either: with memoization on (the default), an API that registers nothing
        # still imports every installed Prefect collection (prefect-kubernetes, -docker, -redis) to
        # hash the block registry against its memo store before it skips: ~1 CPU-s a start, and
        # that much longer before a replacement API answers.
        "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": str(scheduler).lower(),
        **run_history_retention(),
        **redis_settings("127.0.0.1", redis_port),
    })
    return env


def start_ha_prefect(root: Path, pg: Postgres, base_env: Mapping[str, str], ui: bool = False,
                     scheduler: bool = False, api_count: int = 2) -> HAPrefect:
    """A stack on a new database of ``pg`` with a Redis of its own. ``base_env``: what every
    Prefect process inherits (PREFECT_HOME, telemetry off, ...); the database and Redis settings
    are added here. The scheduler is off unless asked for: a test's nightly cron must not add runs."""
    root.mkdir(parents=True, exist_ok=True)
    database = f"prefect_{secrets.token_hex(6)}"
    url = pg.prefect_database(database, base_env)
    redis = start_redis(root)
    env = server_env(base_env, url, redis.port, scheduler)
    started: list[Daemon] = [redis]
    nginx_temp = nginx_temp_root()
    try:
        nginx = start_nginx(root, nginx_temp)
        started.append(nginx)
        balanced = f"http://127.0.0.1:{nginx.port}"
        # The UI each API serves calls the API through nginx too.
        env.update({"PREFECT_UI_API_URL": f"{balanced}/api", "PREFECT_UI_URL": balanced})
        # The services process first: it consumes the events the APIs publish to Redis.
        services = Daemon("prefect-services", [str(PREFECT), "server", "services", "start"], root, env=env)
        started.append(services)
        # Side by side: none of them writes to the database as it starts (the settings above).
        with ThreadPoolExecutor(api_count) as pool:
            starting = [pool.submit(start_api, root, env, index, ui) for index in range(1, api_count + 1)]
        apis = [future.result() for future in starting if future.exception() is None]
        started.extend(apis)  # stopped below if another failed to start
        for future in starting:
            future.result()  # raises the failed start's error
        route_to(nginx, root, [api.port for api in apis], nginx_temp)
        if not services.alive():
            raise StartError(f"prefect server services exited while starting\n{services.log_tail()}")
    except BaseException:
        for daemon in reversed(started):
            daemon.stop()
        shutil.rmtree(nginx_temp, ignore_errors=True)
        raise
    return HAPrefect(root, env, redis, apis, services, nginx, nginx_temp, ui)


def stop_ha_prefect(stack: HAPrefect) -> None:
    """nginx first (no new requests), then the APIs and services, then Redis."""
    for daemon in stack.daemons():
        daemon.stop()
    shutil.rmtree(stack.nginx_temp, ignore_errors=True)
    leftover = [d.name for d in stack.daemons() if d.alive()]
    if leftover:
        raise StartError(f"still running after stop: {leftover}")
