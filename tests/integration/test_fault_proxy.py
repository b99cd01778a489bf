"""The fault proxy itself: what the S3 fault tests and the soak put between every host and S3."""

from __future__ import annotations

import contextlib
import select
import socket
import time

import pytest

from tests.integration.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

BURST = 32  # more than a dataset download's 16 connections at once (protein/data/s3.py)
# Loopback handshakes complete in the kernel within microseconds; a SYN the listen queue dropped is
# sent again only after TCP's 1 s timeout. Half of that tells the two apart on a loaded machine.
HANDSHAKE_WAIT_S = 0.5


def test_a_burst_of_connections_is_queued_whole_while_the_proxy_accepts_none() -> None:
    """A parallel download opens many connections at once. With socketserver's listen queue of 5,
    the kernel dropped the SYNs of all but 6 of them, and each of those waited a second for its
    retry: every parallel transfer through the proxy took a second longer than direct."""
    proxy = FaultProxy("http://127.0.0.1:9")  # never forwarded to: nothing is requested
    proxy.start()
    server = proxy._server
    assert server is not None
    server.shutdown()  # the accept loop stops; the socket still listens, so the queue alone holds the burst
    clients = []
    try:
        for _ in range(BURST):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setblocking(False)
            clients.append(client)
            client.connect_ex(("127.0.0.1", proxy.port))
        pending, deadline = set(clients), time.monotonic() + HANDSHAKE_WAIT_S
        while pending and time.monotonic() < deadline:
            _, writable, _ = select.select([], list(pending), [], max(0.0, deadline - time.monotonic()))
            pending -= set(writable)
        connected = [c for c in clients if c not in pending and c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0]
        assert len(connected) == BURST, f"{len(connected)} of {BURST} connections completed their handshake"
    finally:
        for client in clients:
            with contextlib.suppress(OSError):
                client.close()
        proxy.stop()  # its own shutdown, of a loop already stopped, then the socket's close
