"""Registry lookups at scale: `find_by_run` and `models list` before and after the run index and
concurrent spec fetches, side by side on the same store.

    python -m bench.registry_bench [--versions 1000] [--repeats 3] [--quick]

A real moto_server on 127.0.0.1 holds N versions laid out exactly as `Registry.register` writes them
(weights, model.json, run index). "before" is the previous algorithm, run against the same store:
`find_by_run` read every model.json in turn (N+1 requests), `models list` fetched them one by one.
"after" is the shipped code. Requests are counted at the store interface (one call, one request).
Medians of alternating repeats; the ratio is before / after.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from bench.common import format_table, machine_info, median, results_path, write_json


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def moto_server() -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        endpoint = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        raise RuntimeError("moto_server did not start") from None
                    time.sleep(0.1)
            yield endpoint
        finally:
            proc.terminate()
            proc.wait(timeout=10)


@contextmanager
def latency_proxy(upstream: str, latency_s: float) -> Iterator[str]:
    """Forwards to ``upstream`` after waiting ``latency_s`` per request: the round trip a real S3
    endpoint adds (moto on loopback answers in well under a millisecond of network time)."""
    import http.client
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import urlsplit

    target = urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def setup(self) -> None:
            super().setup()
            # Headers and body go out as two writes: without this, Nagle's algorithm meets the client's
            # delayed ACK and every answer waits ~40 ms, a latency no real endpoint adds.
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(latency_s)
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                answer = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("connection", "transfer-encoding", "server", "date"):
                        self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)
            finally:
                conn.close()

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    class Server(ThreadingHTTPServer):
        # socketserver's queue of 5 drops the SYNs of a burst of connections (boto3 opens up to 10),
        # which then retry after TCP's 1 s timeout: a latency no real endpoint adds.
        request_queue_size = 128

    server = Server(("127.0.0.1", free_port()), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class CountingStore:
    """Counts store calls (each is one S3 request for the calls the registry makes here)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return attr(*args, **kwargs)

        return counted


def populate(store: Any, n: int) -> list[str]:
    """N versions as `register` lays them out; model.json is a realistic ~3 KB document."""
    from protein.labels import LABELS
    from protein.registry import RUN_INDEX_PREFIX, SPEC_FILE, WEIGHTS_FILE

    def one(i: int) -> str:
        version, run = f"20250101-{i:06d}-resnet18-{uuid.uuid4().hex[:8]}", f"run-{i:06d}"
        weights = os.urandom(64)
        spec = {"format": "protein-model/1", "id": version, "created": f"2025-01-01T00:00:{i % 60:02d}Z",
                "weights_sha256": hashlib.sha256(weights).hexdigest(), "weights_size": len(weights),
                "arch": "resnet18", "image_size": 256, "run_id": run, "class_names": list(LABELS),
                "thresholds": [0.5] * len(LABELS), "metrics": {"f1_samples": 0.5, "per_class": [0.5] * len(LABELS)},
                "history": [{"epoch": e, "train_loss": 0.1, "holdout_f1_samples": 0.5} for e in range(10)]}
        store.put_bytes(f"models/{version}/{WEIGHTS_FILE}", weights, if_none_match=True)
        store.put_bytes(f"models/{version}/{SPEC_FILE}", json.dumps(spec, indent=2).encode(), if_none_match=True)
        store.put_bytes(f"{RUN_INDEX_PREFIX}{run}.json", json.dumps({"run_id": run, "model_id": version}).encode(),
                        if_none_match=True)
        return version

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, range(n)))


# --- the previous algorithms, kept here as the baseline ---------------------------------------------
def find_by_run_before(registry: Any, run_id: str) -> str | None:
    found = [v for v in registry.versions() if registry.spec(v).get("run_id") == run_id]
    return found[-1] if found else None


def listing_before(registry: Any) -> list[dict[str, Any]]:
    champion = registry.champion().champion
    rows = []
    for version in registry.versions():
        spec = registry.spec(version)
        rows.append({"id": version, "created": spec.get("created"), "champion": version == champion,
                     "arch": spec.get("arch"), "metrics": spec.get("metrics", {})})
    return rows


def measure(fn: Callable[[], Any], store: CountingStore) -> tuple[float, int, Any]:
    store.calls = 0
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, store.calls, value


def run_cases(registry: Any, store: CountingStore, versions: list[str], repeats: int) -> dict[str, dict[str, list]]:
    n = len(versions)
    target = f"run-{n // 2:06d}"  # a run in the middle; the old scan reads every version either way
    cases: dict[str, dict[str, list[Any]]] = {
        name: {"s": [], "requests": []} for name in
        ("find_by_run before", "find_by_run after", "models list before", "models list after")}
    for _ in range(repeats):  # alternate, so both see the same machine load
        for name, fn in (("find_by_run before", lambda: find_by_run_before(registry, target)),
                         ("find_by_run after", lambda: registry.find_by_run(target)),
                         ("models list before", lambda: listing_before(registry)),
                         ("models list after", registry.listing)):
            seconds, calls, value = measure(fn, store)
            if name.startswith("find_by_run"):
                assert value == versions[n // 2], (name, value)
            else:
                assert len(value) == n, (name, len(value))
            cases[name]["s"].append(seconds)
            cases[name]["requests"].append(calls)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 20.0],
                        help="per-request latency added in front of moto (0: loopback; ~20: an S3 round trip)")
    parser.add_argument("--quick", action="store_true", help="100 versions, 1 repeat (smoke run)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    n, repeats = (100, 1) if args.quick else (args.versions, args.repeats)

    from protein.registry import Registry
    from protein.storage import open_store

    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    with moto_server() as endpoint:
        os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"})
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
        started = time.perf_counter()
        versions = populate(open_store(f"s3://{bucket}/registry"), n)
        populate_s = time.perf_counter() - started
        for latency_ms in args.latency_ms:
            with latency_proxy(endpoint, latency_ms / 1000) if latency_ms else nullcontext(endpoint) as proxied:
                os.environ["AWS_ENDPOINT_URL"] = proxied
                store = CountingStore(open_store(f"s3://{bucket}/registry"))
                registry = Registry(store)  # type: ignore[arg-type]
                cases = run_cases(registry, store, versions, repeats)
            raw[f"{latency_ms}ms"] = cases
            for op in ("find_by_run", "models list"):
                before, after = cases[f"{op} before"], cases[f"{op} after"]
                rows.append({"operation": op, "added_latency_ms": latency_ms, "versions": n,
                             "before_s": median(before["s"]), "after_s": median(after["s"]),
                             "speedup": median(before["s"]) / median(after["s"]),
                             "before_requests": before["requests"][0], "after_requests": after["requests"][0]})

    result = {"versions": n, "repeats": repeats, "populate_s": populate_s, "results": rows, "raw": raw,
              "store": "moto_server over HTTP on 127.0.0.1 (0 ms: direct; otherwise behind a proxy that adds the "
                       "stated latency to every request)",
              "machine": machine_info()}
    path = write_json(args.out or results_path("registry", args.quick), result)
    print(format_table(rows, ["operation", "added_latency_ms", "versions", "before_s", "after_s", "speedup",
                              "before_requests", "after_requests"]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
