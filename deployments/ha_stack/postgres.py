"""PostgreSQL for the stack: a cluster in a temporary folder, run as an unprivileged user and
password-authenticated on 127.0.0.1 only, holding a template database that Prefect's migrations
and block registration fill once (restored from a dump by later clusters of the same versions);
each stack gets a copy of it."""

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
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from deployments.ha_stack.daemons import PREFECT, Daemon, StartError, start_listening

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
        # Created 0600, never readable by others for a moment: the root is 0755 (the database user must
        # get in), and the superuser's password lets any local user run code as that user.
        descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(self.password)
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
