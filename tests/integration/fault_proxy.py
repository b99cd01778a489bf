"""A fault-injecting HTTP proxy in front of a real moto_server (shared by the S3 fault tests)."""

from __future__ import annotations

import datetime as dt
import http.client
import re
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit


class BurstServer(ThreadingHTTPServer):
    """A threading HTTP server whose listen queue holds a client's burst of connections.

    socketserver's default queue is 5 connections: a download of a dataset's folder opens 16 at
    once (protein/data/s3.py), the kernel drops the SYNs that do not fit, and those connections
    retry after TCP's 1-second SYN timeout. Every parallel transfer through the proxy took a second
    more than the same transfer direct (24 small GETs: 1.07 s against 0.09 s), and a soak's month
    paid that on every push, validation and training download."""

    request_queue_size = 128


class FaultProxy:
    """An HTTP proxy in front of the S3 server that injects faults at chosen requests.

    Every answer closes its connection, so `stop()` really leaves clients with nothing to talk to
    (connection refused), like a stopped server; the server behind keeps its state, so what a
    fault left behind can be inspected afterwards.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.port = 0  # the first start() lets the OS pick a free one; restarts keep it
        # moto lists every multipart upload as initiated in 2010 (a constant): the proxy notes when each
        # upload was really created, on this machine's clock, and answers with that instead.
        self.initiated: dict[str, float] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._errors: list[list[Any]] = []  # [match, remaining, status, code]
        self._cuts: list[list[Any]] = []  # [match, skip]
        self._lost: list[list[Any]] = []  # [match, remaining]
        self._truncated: list[list[Any]] = []  # [match, remaining]
        # Request headers removed before forwarding: an endpoint that ignores them (e.g. If-None-Match).
        self.drop_headers: set[str] = set()
        self._server: BurstServer | None = None
        self.down = True

    # --- faults ---
    def fail(self, match: Callable[[str, str], bool], times: int, status: int = 503, code: str = "SlowDown") -> None:
        """Answer the next `times` matching requests with an S3 error instead of forwarding them."""
        self._errors.append([match, times, status, code])

    def cut(self, match: Callable[[str, str], bool], skip: int = 0) -> None:
        """Let `skip` matching requests through, then forward only half of the next one's body and
        go down, as if the server died mid-upload."""
        self._cuts.append([match, skip])

    def lose_response(self, match: Callable[[str, str], bool], times: int = 1) -> None:
        """Forward the next `times` matching requests, let the server act on them, then drop the
        connection instead of answering: the request landed, the client never hears so."""
        self._lost.append([match, times])

    def truncate_response(self, match: Callable[[str, str], bool], times: int = 1) -> None:
        """Answer the next `times` matching requests with the full headers but only half the body,
        then hang up: a download that breaks off mid-transfer."""
        self._truncated.append([match, times])

    def _decide(self, method: str, path: str) -> tuple[str, Any]:
        with self._lock:
            self.requests.append((method, path))
            if self.down:
                return "drop", None
            for rule in self._cuts:
                if rule[0](method, path):
                    if rule[1] == 0:
                        self._cuts.remove(rule)
                        self.down = True
                        return "cut", None
                    rule[1] -= 1
            for rule in self._errors:
                if rule[1] > 0 and rule[0](method, path):
                    rule[1] -= 1
                    return "error", (rule[2], rule[3])
            for rule in self._lost:
                if rule[1] > 0 and rule[0](method, path):
                    rule[1] -= 1
                    return "lose", None
            for rule in self._truncated:
                if rule[1] > 0 and rule[0](method, path):
                    rule[1] -= 1
                    return "truncate", None
            return "forward", None

    @property
    def endpoint(self) -> str:
        assert self.port, "start() the proxy first: it has no port before"
        return f"http://127.0.0.1:{self.port}"

    def backdate(self, upload_id: str, seconds: float) -> None:
        """Make the multipart upload `upload_id` look `seconds` older than it is."""
        self.initiated[upload_id] -= seconds

    def _note_and_restate_initiated(self, method: str, path: str, answer: bytes) -> bytes:
        query = path.partition("?")[2]
        if method == "POST" and re.search(r"(^|&)uploads(=|&|$)", query):
            found = re.search(rb"<UploadId>([^<]+)</UploadId>", answer)
            if found:
                self.initiated[found.group(1).decode()] = time.time()
        elif method == "GET" and re.search(r"(^|&)uploads(=|&|$)", query):
            def restate(upload: re.Match[bytes]) -> bytes:
                upload_id = re.search(rb"<UploadId>([^<]+)</UploadId>", upload.group(0))
                when = self.initiated.get(upload_id.group(1).decode()) if upload_id else None
                if when is None:
                    return upload.group(0)
                stamp = dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
                return re.sub(rb"<Initiated>[^<]*</Initiated>", f"<Initiated>{stamp}</Initiated>".encode(),
                              upload.group(0))

            answer = re.sub(rb"<Upload>.*?</Upload>", restate, answer, flags=re.DOTALL)
        return answer

    # --- server ---
    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers Expect: 100-continue like S3 does

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("connection", "transfer-encoding", "content-length", "server", "date"):
                        self.send_header(name, value)
                # A HEAD answer has no body but states the object's length: pass that on unchanged.
                upstream_length = next((v for k, v in headers if k.lower() == "content-length"), None)
                length = upstream_length if self.command == "HEAD" and upstream_length else str(len(body))
                self.send_header("Content-Length", length)
                self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                self.close_connection = True

            def _handle(self) -> None:
                action, detail = proxy._decide(self.command, self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "cut":
                    proxy._send_partial(self.command, self.path, self.headers, self.rfile.read(length // 2), length)
                    self.close_connection = True
                    threading.Thread(target=proxy._close_listener, daemon=True).start()
                    return
                body = self.rfile.read(length) if length else b""
                if action == "error":
                    status, code = detail
                    xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected by the test proxy</Message></Error>").encode()
                    self._reply(status, [("Content-Type", "application/xml")], xml)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    dropped = {"expect", "connection"} | {h.lower() for h in proxy.drop_headers}
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    answer = response.read()
                    if action == "lose":
                        self.close_connection = True
                        return
                    if action == "truncate":
                        self.send_response(response.status)
                        for name, value in response.getheaders():
                            if name.lower() not in ("connection", "transfer-encoding", "server", "date"):
                                self.send_header(name, value)
                        self.send_header("Connection", "close")
                        self.end_headers()
                        self.wfile.write(answer[: len(answer) // 2])
                        self.close_connection = True
                        return
                    answer = proxy._note_and_restate_initiated(self.command, self.path, answer)
                    self._reply(response.status, response.getheaders(), answer)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        server = BurstServer(("127.0.0.1", self.port), Handler)  # bound (and listening) here
        self.port = int(server.server_address[1])
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server
        self.down = False

    def _send_partial(self, method: str, path: str, headers: Any, half: bytes, length: int) -> None:
        with socket.create_connection((self.upstream.hostname, self.upstream.port), timeout=10) as sock:
            lines = [f"{method} {path} HTTP/1.1"]
            lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("expect", "connection")]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + half)
            assert len(half) < length  # the server is left waiting for the rest, then loses the client

    def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def stop(self) -> None:
        self.down = True
        self._close_listener()

    def count(self, match: Callable[[str, str], bool]) -> int:
        return sum(1 for method, path in self.requests if match(method, path))
