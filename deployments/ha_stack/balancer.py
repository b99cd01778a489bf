"""nginx in front of the API processes: least-connections balancing, passive health checks (a
failed connect marks an API down for `fail_timeout` and the request goes to the other), websocket
upgrades passed on, idle connections to the APIs kept for reuse."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from deployments.ha_stack.daemons import Daemon, StartError, http_ok, start_listening

NGINX = "/usr/sbin/nginx"

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
