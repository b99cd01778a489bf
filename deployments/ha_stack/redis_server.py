"""Redis for the stack: the event broker, causal ordering, lease storage and the services' Docket
queue of Prefect's self-hosting guide, on loopback, nothing saved to disk."""

from __future__ import annotations

import contextlib
import shutil
import socket
from pathlib import Path
from urllib.parse import quote

from deployments.ha_stack.daemons import Daemon, StartError, start_listening

# How long the event stream keeps what a silent services process has not read yet.
EVENTS_KEPT_FOR_IDLE_SERVICES_S = 24 * 3600


def redis_settings(host: str, port: int, docket_db: int = 1, password: str | None = None) -> dict[str, str]:
    """The Redis settings of Prefect's self-hosting guide (the event broker and cache, causal
    ordering, concurrency lease storage, the background services' Docket queue), and those a
    month of operation needs beyond it: events kept for a services process that is down, and
    the workers' clean-up messages shared by every server process. ``password``: that of a Redis
    with `requirepass`, carried by every setting that reaches it."""
    # The Docket and clean-up queue URLs must carry the password themselves: with a URL set,
    # prefect_redis ignores the host and password settings.
    credentials = f":{quote(password, safe='')}@" if password else ""
    return {
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": host,
        "PREFECT_REDIS_MESSAGING_PORT": str(port),
        "PREFECT_REDIS_MESSAGING_DB": "0",
        **({"PREFECT_REDIS_MESSAGING_PASSWORD": password} if password else {}),
        "PREFECT_SERVER_DOCKET_URL": f"redis://{credentials}{host}:{port}/{docket_db}",
        # Each event an API receives goes to Redis before it reads the next. The default holds up
        # to 4 received events in the API's memory for up to 10 s: a SIGKILLed API loses them,
        # and a client that has moved on never resends (task-run states arrive only as events,
        # so a task run stays Running under a finished flow run). Redis gets one XADD per event
        # either way: the batch only delayed them, and every trigger they fire.
        "PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE": "1",
        # Each API trims the event stream every minute to what every consumer group has read, but
        # leaves out a group whose consumers have all been idle over this threshold (default 5 min):
        # a services process down longer than that (a crash, an upgrade) came back to a stream cut
        # past what it had read, and the events received meanwhile (task-run states, push triggers,
        # failure alerts) were gone. A day of events is a few MB here; a services process down
        # longer than a day is an incident of its own.
        "PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD": str(EVENTS_KEPT_FOR_IDLE_SERVICES_S),
        # The "stop this run's process" messages the services process queues for workers (a run
        # stuck in Cancelling) live by default in that process's memory, where no worker reads them:
        # workers fetch them from an API process.
        "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
        "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL": f"redis://{credentials}{host}:{port}/0",
    }


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
