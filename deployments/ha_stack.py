"""A throwaway highly available Prefect server on this machine, from Debian's packages and PyPI:
PostgreSQL, Redis, two `prefect server start --no-services` API processes on one database, one
`prefect server services start` process, and nginx balancing the two APIs. The layout and the
settings are those of Prefect's "scale self-hosted Prefect" guide (see docs/runbook.md,
"Production"); tests and bench/ha_load.py stand it up through this module.

    with running_postgres(root) as pg:
        stack = start_ha_prefect(root / "a", pg, base_env)   # base_env: PREFECT_HOME, telemetry off...
        ...  # clients use stack.client_env(base_env): PREFECT_API_URL is nginx
        stop_ha_prefect(stack)

Every process listens on 127.0.0.1 only, on a port picked free and held by retrying: a port taken
between the pick and the bind makes that process exit, and it is started again on another.

nginx's open-source build has no active health checks (`health_check` is NGINX Plus): the
upstreams are checked passively, a failed connect marks one down for `fail_timeout` and the request
goes to the other (`proxy_next_upstream`); Prefect's client retries what nginx answers 502.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import importlib.metadata
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

PREFECT = Path(sys.executable).parent / "prefect"
START_TIMEOUT_S = 120.0
PORT_ATTEMPTS = 5
# The words each program logs when its port was taken between the pick and its bind.
PORT_TAKEN = ("Address already in use", "address already in use", "could not bind", "is already in use")
PG_USER = "prefect"
TEMPLATE_DB = "prefect_template"
# What an API process does as it starts (prefect/server/api/server.py, `add_block_types`), done once
# on the template: API processes starting together on a database without block types both insert
# them, and all but one exit on uq_block_type__slug (tried: two of three side-by-side starts failed so).
REGISTER_BLOCK_TYPES = """
import asyncio

from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration


async def register() -> None:
    async with await provide_database_interface().session() as session:
        await run_block_auto_registration(session=session)


asyncio.run(register())
"""
# initdb and postgres refuse to run as root; as root they run as this unprivileged user.
PG_OS_USER = "nobody"
NGINX = "/usr/sbin/nginx"


def redis_settings(host: str, port: int, docket_db: int = 1) -> dict[str, str]:
    """The Redis settings of Prefect's self-hosting guide: the event broker and cache, causal
    ordering, concurrency lease storage and the background services' Docket queue."""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": host,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        "PREFECT_SERVER_DOCKET_URL": f"redis://{host}:{port}/{docket_db}",
        # Each event an API receives goes to Redis before it reads the next. The default holds up
        # to 4 received events in the API's memory for up to 10 s: a SIGKILLed API loses them,
        # and a client that has moved on never resends (task-run states arrive only as events,
        # so a task run stays Running under a finished flow run). Redis gets one XADD per event
        # either way: the batch only delayed them, and every trigger they fire.
        "PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE": "1",
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """One server process in a session of its own (stopping it stops its children), output to
    a log file: a pipe nobody reads would fill and block it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
                 port: int = 0) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_dir / f"{name}.log"
        self.started_at = time.monotonic()
        self.ready_at: float | None = None  # when start_listening found it answering
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, env=dict(env) if env is not None else None, cwd=log_dir,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 20.0) -> None:
        """``sig`` to the process group, SIGKILL after ``grace_s``; returns once it has exited."""
        if self.alive():
            self.send(sig)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.send(signal.SIGKILL)
                self.process.wait(timeout=30)
        self.send(signal.SIGKILL)  # children left in the group (uvicorn's, nginx's workers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        return f"--- {self.name} (last {chars} chars) ---\n{self.log()[-chars:]}"


class StartError(RuntimeError):
    pass


def start_listening(name: str, launch: Callable[[int], Daemon], ready: Callable[[int], bool],
                    port: int | None = None, timeout_s: float = START_TIMEOUT_S) -> Daemon:
    """Start ``launch(port)`` until ``ready(port)``; a daemon that exits because its port was
    taken meanwhile is started again on another free port (``port``, when given, is kept)."""
    for _ in range(PORT_ATTEMPTS):
        chosen = port or free_port()
        daemon = launch(chosen)
        deadline = time.monotonic() + timeout_s
        while daemon.alive() and not ready(chosen):
            if time.monotonic() > deadline:
                daemon.stop(signal.SIGKILL)
                raise StartError(f"{name} not ready on port {chosen} within {timeout_s:.0f}s\n{daemon.log_tail()}")
            time.sleep(0.2)
        if daemon.alive():
            daemon.ready_at = time.monotonic()
            return daemon
        if not any(words in daemon.log() for words in PORT_TAKEN):
            raise StartError(f"{name} exited with {daemon.process.returncode} while starting\n{daemon.log_tail()}")
        time.sleep(0.5)
    raise StartError(f"{name}: no free port after {PORT_ATTEMPTS} attempts\n{daemon.log_tail()}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def postgres_bin(program: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    on_path = shutil.which(program)
    if on_path is None:
        raise StartError(f"{program} not found: install PostgreSQL (`make stack` installs Debian's postgresql)")
    return on_path


def as_db_user(argv: list[str]) -> list[str]:
    return ["runuser", "-u", PG_OS_USER, "--", *argv] if os.geteuid() == 0 else argv


def register_block_types(env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    """REGISTER_BLOCK_TYPES in a fresh interpreter, on the database of env's
    PREFECT_API_DATABASE_CONNECTION_URL; its output captured."""
    return subprocess.run([sys.executable, "-c", REGISTER_BLOCK_TYPES], capture_output=True, text=True, timeout=600,
                          env=dict(env))


def succeeded(what: str, done: subprocess.CompletedProcess[str]) -> None:
    """A set-up step that failed raises StartError with the tail of what it printed."""
    if done.returncode != 0:
        raise StartError(f"{what} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


@dataclass
class Postgres:
    """A PostgreSQL cluster in a temporary folder, password-authenticated on 127.0.0.1 only."""

    root: Path
    port: int = 0
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    daemon: Daemon | None = None
    migrated: bool = False
    # A folder where the migrated template is kept as a dump and restored from by later clusters of
    # the same Prefect and PostgreSQL (the tests' clusters of one run share one): a restore takes a
    # fraction of a second, the migrations and the block registration ~7 s and ~6 CPU-s.
    template_cache: Path | None = None

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{PG_USER}:{self.password}@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        # The cluster's folder belongs to the unprivileged user; its parent must let it in.
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.data.mkdir(mode=0o700)
        password_file = self.root / "pwfile"
        password_file.write_text(self.password)
        if os.geteuid() == 0:
            shutil.chown(self.data, PG_OS_USER)
            shutil.chown(password_file, PG_OS_USER)
        done = subprocess.run(as_db_user([postgres_bin("initdb"), "-D", str(self.data), "-U", PG_USER,
                                          f"--pwfile={password_file}", "--auth=scram-sha-256", "-E", "UTF8",
                                          "--no-sync"]), capture_output=True, text=True, timeout=180)
        password_file.unlink()
        if done.returncode != 0:
            raise StartError(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")

    def start(self) -> None:
        def launch(port: int) -> Daemon:
            return Daemon("postgres", as_db_user([
                postgres_bin("postgres"), "-D", str(self.data), "-p", str(port), "-c", "listen_addresses=127.0.0.1",
                "-c", "unix_socket_directories=", "-c", "max_connections=300", "-c", "fsync=off",
                "-c", "logging_collector=off"]), self.root, port=port)

        self.daemon = start_listening("postgres", launch, self.ready, port=self.port or None)
        self.port = self.daemon.port

    def ready(self, port: int) -> bool:
        return subprocess.run([postgres_bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                              timeout=10).returncode == 0

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop(signal.SIGINT)  # "fast" shutdown: roll back open transactions, then exit

    def psql(self, sql: str, database: str = "postgres") -> str:
        done = self.client("psql", "-d", database, "-v", "ON_ERROR_STOP=1", "-Atc", sql, timeout_s=120)
        if done.returncode != 0:
            raise StartError(f"psql {sql!r}: {done.stderr.strip()}")
        return done.stdout

    def prefect_database(self, name: str, env: Mapping[str, str]) -> str:
        """A fresh database holding Prefect's schema and block types: the migrations and the block
        registration run once, into a template database, and every stack gets a copy of it
        (CREATE DATABASE ... TEMPLATE), so its API processes can start side by side."""
        if not self.migrated:
            self.psql(f"CREATE DATABASE {TEMPLATE_DB}")
            self.fill_template(env)
            self.migrated = True
        self.psql(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
        return self.url(name)

    def fill_template(self, env: Mapping[str, str]) -> None:
        """Prefect's schema and block types into the template database: restored from
        template_cache when it holds them for this Prefect and PostgreSQL, else migrated and
        registered (and dumped there). A cluster that finds another filling the cache waits for it."""
        if self.template_cache is None:
            self.migrate_template(env)
            return
        self.template_cache.mkdir(parents=True, exist_ok=True)
        dump = self.template_cache / f"prefect-template-{template_key()}.dump"
        with (self.template_cache / "lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if dump.exists():
                succeeded("restoring the cached Prefect template", self.client(
                    "pg_restore", "--no-owner", "--exit-on-error", "-d", TEMPLATE_DB, str(dump)))
                return
            self.migrate_template(env)
            partial = dump.with_name(dump.name + ".partial")
            succeeded("dumping the Prefect template", self.client("pg_dump", "-Fc", "-f", str(partial), TEMPLATE_DB))
            partial.rename(dump)  # whole or absent: a killed dump leaves only the .partial

    def migrate_template(self, env: Mapping[str, str]) -> None:
        template = {**env, "PREFECT_API_DATABASE_CONNECTION_URL": self.url(TEMPLATE_DB)}
        succeeded("prefect server database upgrade", subprocess.run(
            [str(PREFECT), "server", "database", "upgrade", "-y"], capture_output=True, text=True, timeout=600,
            cwd=self.root, env=template))
        succeeded("the block type registration", register_block_types(template))

    def client(self, program: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """One of PostgreSQL's client programs (psql, pg_dump, pg_restore) against this cluster, as
        its user; the password from the environment, never on the command line."""
        return subprocess.run([postgres_bin(program), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, *args],
                              capture_output=True, text=True, env={**os.environ, "PGPASSWORD": self.password},
                              timeout=timeout_s)


def template_key() -> str:
    """What a migrated template depends on: Prefect and its installed collections (their block
    types), and PostgreSQL's version."""
    prefect = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                     if (d.metadata["Name"] or "").lower().startswith("prefect"))
    return hashlib.sha256("\n".join([*prefect, postgres_bin("postgres")]).encode()).hexdigest()[:16]


@contextlib.contextmanager
def running_postgres(parent: Path | None = None, template_cache: Path | None = None) -> Iterator[Postgres]:
    """A started cluster in a new folder (under ``parent`` when given: it must be one the
    unprivileged user can enter), stopped and removed on the way out. ``template_cache``: see
    Postgres.template_cache."""
    root = Path(tempfile.mkdtemp(prefix="protein-pg-", dir=parent))
    pg = Postgres(root, template_cache=template_cache)
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


def start_redis(root: Path) -> Daemon:
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(redis_server).exists():
        raise StartError("redis-server not found: install Redis (`make stack` installs Debian's redis-server)")

    def launch(port: int) -> Daemon:
        return Daemon("redis", [redis_server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                "--appendonly", "no", "--dir", str(root), "--protected-mode", "yes"], root, port=port)

    def ready(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    return start_listening("redis", launch, ready)


# Idle connections nginx's worker keeps open to the APIs, all of them together.
UPSTREAM_KEEPALIVE = 16


def nginx_config(root: Path, port: int, upstreams: list[int], temp_root: Path) -> str:
    # Before the APIs exist, an upstream that is never chosen (nginx needs one).
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=10s;" for p in upstreams) \
        or "        server 127.0.0.1:9 down;"
    temp = "\n".join(f"    {kind}_temp_path {temp_root / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    user = "user nobody nogroup;" if os.geteuid() == 0 else ""
    return f"""{user}
daemon off;
worker_processes 1;
pid {root / 'nginx.pid'};
error_log {root / 'nginx-error.log'} warn;
events {{ worker_connections 1024; }}
http {{
{temp}
    log_format upstream '$upstream_addr $status $request_time "$request"';
    access_log {root / 'nginx-access.log'} upstream;
    # A websocket's upgrade is passed on; any other request goes with no Connection header, so
    # the connection to the API stays open for the next one (keepalive below).
    map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
    upstream prefect_api {{
        least_conn;
{servers}
        # Idle connections to the APIs kept for reuse: a new connection for every proxied request
        # cost an API ~0.6 ms of CPU on a ~5 ms read (docs/runbook.md, "Production"). nginx drops
        # them after 4 s, before the API's own keep-alive timeout (uvicorn's 5 s) could close one
        # under a request; a killed API's are closed by the kernel and dropped from the cache.
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        client_body_buffer_size 1m;
        location / {{
            proxy_pass http://prefect_api;
            proxy_http_version 1.1;
            # Clients send events over a websocket (/api/events/in).
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_connect_timeout 2s;
            proxy_read_timeout 300s;
            # A refused or reset connect goes to the other API; a request already sent is not
            # replayed (POSTs are not idempotent): the client sees 502 and retries.
            proxy_next_upstream error timeout http_502 http_503;
        }}
    }}
}}
"""


def nginx_temp_root() -> Path:
    """Where nginx's workers buffer large bodies: they run as `nobody` when nginx is started as
    root, so a folder of theirs in /tmp (a test's own tmp folder is closed to other users)."""
    temp_root = Path(tempfile.mkdtemp(prefix="protein-nginx-"))
    if os.geteuid() == 0:
        shutil.chown(temp_root, "nobody", "nogroup")
    return temp_root


def start_nginx(root: Path, temp_root: Path) -> Daemon:
    """nginx on a free port with no upstream yet (the API processes start after it, so that
    their UI can be told the balanced address); route_to() names them."""
    if not Path(NGINX).exists():
        raise StartError(f"{NGINX} not found: install nginx (`make stack` installs Debian's nginx)")

    def launch(port: int) -> Daemon:
        (root / "nginx.conf").write_text(nginx_config(root, port, [], temp_root))
        return Daemon("nginx", [NGINX, "-p", str(root), "-e", str(root / "nginx-error.log"), "-c",
                                str(root / "nginx.conf")], root, port=port)

    def listening(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    return start_listening("nginx", launch, listening)


def route_to(nginx: Daemon, root: Path, upstreams: list[int], temp_root: Path) -> None:
    """Point nginx at the API ports (a reload: SIGHUP to its master) and wait until it answers."""
    (root / "nginx.conf").write_text(nginx_config(root, nginx.port, upstreams, temp_root))
    nginx.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while not http_ok(f"http://127.0.0.1:{nginx.port}/api/health"):
        if time.monotonic() > deadline or not nginx.alive():
            raise StartError(f"nginx does not reach the APIs {upstreams}\n{nginx.log_tail()}")
        time.sleep(0.2)


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


def start_ha_prefect(root: Path, pg: Postgres, base_env: Mapping[str, str], ui: bool = False,
                     scheduler: bool = False, api_count: int = 2) -> HAPrefect:
    """A stack on a new database of ``pg`` with a Redis of its own. ``base_env``: what every
    Prefect process inherits (PREFECT_HOME, telemetry off, ...); the database and Redis settings
    are added here. The scheduler is off unless asked for: a test's nightly cron must not add runs."""
    root.mkdir(parents=True, exist_ok=True)
    database = f"prefect_{secrets.token_hex(6)}"
    url = pg.prefect_database(database, base_env)
    redis = start_redis(root)
    env = {k: v for k, v in base_env.items() if k != "PREFECT_API_URL"}
    env.update({
        "PREFECT_API_DATABASE_CONNECTION_URL": url,
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
        **redis_settings("127.0.0.1", redis.port),
    })
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


USAGE = ("usage: python -m deployments.ha_stack [register-block-types]\n"
         "  no argument: stand a stack up here until Ctrl-C (a demo of the layout)\n"
         "  register-block-types: register Prefect's block types in the database of "
         "PREFECT_API_DATABASE_CONNECTION_URL, once, after `prefect server database upgrade`")


def main(argv: list[str] | None = None) -> int:
    """`python -m deployments.ha_stack`: stand the stack up here until Ctrl-C (a demo of the layout);
    `... register-block-types`: the one-off step before API processes that start with
    PREFECT_API_BLOCKS_REGISTER_ON_START=false (docs/runbook.md, "Production")."""
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["register-block-types"]:
        if not os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL"):
            print("PREFECT_API_DATABASE_CONNECTION_URL is not set: it names the database to register "
                  "the block types in", file=sys.stderr)
            return 2
        done = register_block_types(os.environ)
        if done.returncode != 0:  # one line, the error's own: the database URL (its password) stays out
            last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            print(f"registering Prefect's block types in PREFECT_API_DATABASE_CONNECTION_URL's database failed: "
                  f"{last}", file=sys.stderr)
            return 1
        return 0
    if argv:
        print(USAGE, file=sys.stderr)
        return 2
    with running_postgres() as pg:
        home = pg.root / "prefect-home"
        home.mkdir()
        base = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        stack = start_ha_prefect(pg.root / "stack", pg, base, ui=True)
        print(f"PREFECT_API_URL={stack.api_url}  (UI: {stack.ui_url}); Ctrl-C stops it", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        finally:
            stop_ha_prefect(stack)
    return 0


if __name__ == "__main__":
    sys.exit(main())
