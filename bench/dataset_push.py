"""What a dataset push costs when the data grew a little: content-addressed (shipped) vs full copy (before).

    python -m bench.dataset_push [--images 2000] [--added 500] [--size 64] [--quick]

A real moto_server on 127.0.0.1. A synthetic dataset of N train images (random PNGs, `--size` px) is
pushed, then the same dataset plus `--added` images (and the train.csv that lists them). Measured for
the second push, side by side on the same server:

- "content-addressed": `protein.data.push.push_dataset` (format 2: objects by SHA-256, manifest last);
- "full copy": the previous push (format 1), kept here as `push_full_copy`: every file PUT create-only
  under datasets/<fingerprint>/, then its manifest; readers still open such datasets.

Requests and uploaded bytes are counted on the wire: a botocore ``before-send`` hook on the store's own
client sees every HTTP request (retries included) and its body. Seconds are loopback wall time on a
shared machine: indicative only; the counts are the result.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import format_table, machine_info, results_path, write_json
from bench.registry_bench import moto_server


def write_synthetic(root: Path, train: int, test: int, size: int, seed: int = 0) -> Path:
    """A flat competition folder: train.csv, sample_submission.csv, train/<id>.png, test/<id>.png.
    Image i is the same bytes in every call, so a larger dataset contains the smaller one."""
    import numpy as np
    from PIL import Image

    for folder in ("train", "test"):
        (root / folder).mkdir(parents=True, exist_ok=True)

    def png(path: Path, index: int) -> None:
        pixels = np.random.default_rng([seed, index]).integers(0, 256, (size, size, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        path.write_bytes(buffer.getvalue())

    rows = ["Image,Label"]
    for i in range(train):
        png(root / "train" / f"img{i:06d}.png", i)
        rows.append(f"img{i:06d},{i % 10}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    tests = ["Image,Label"]
    for i in range(test):
        png(root / "test" / f"t{i:06d}.png", 10_000_000 + i)
        tests.append(f"t{i:06d},0")
    (root / "sample_submission.csv").write_text("\n".join(tests) + "\n")
    return root


def push_full_copy(data: str, store: Any) -> str:
    """The format-1 push as it was before content addressing: a full copy of every file under
    datasets/<fingerprint>/ (create-only), then a manifest listing each with size, MD5 and SHA-256.
    Kept to measure the old cost and to write old-format datasets that readers must still open."""
    from protein.data.digests import md5_bytes
    from protein.data.fingerprint import fingerprint_of
    from protein.data.manifest import FORMAT_FULL_COPY, ManifestEntry, manifest_doc
    from protein.data.tables import load_competition
    from protein.errors import PreconditionFailed

    parsed = load_competition(data, require_test=False)
    digests = parsed.source.digests()
    fp = fingerprint_of(digests)
    base = f"datasets/{fp}"
    if store.exists(f"{base}/manifest.json"):
        return fp
    entries = {}
    for name in sorted(digests):
        blob = parsed.source.read_bytes(name)
        entries[name] = ManifestEntry(len(blob), md5_bytes(blob), hashlib.sha256(blob).hexdigest())
        with contextlib.suppress(PreconditionFailed):
            store.put_bytes(f"{base}/{name}", blob, if_none_match=True)
    doc = manifest_doc(fp, entries, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                       len(parsed.train_ids), len(parsed.test_ids))
    doc["format"] = FORMAT_FULL_COPY
    store.put_bytes(f"{base}/manifest.json", json.dumps(doc, indent=1, sort_keys=True).encode(), if_none_match=True)
    return fp


class WireCounter:
    """Counts the HTTP requests a boto3 client sends while registered on it, and the body bytes of its uploads."""

    def __init__(self) -> None:
        self.requests = 0
        self.upload_bytes = 0
        self.by_method: dict[str, int] = {}

    def __call__(self, request: Any, **_: Any) -> None:
        self.requests += 1
        self.by_method[request.method] = self.by_method.get(request.method, 0) + 1
        body = request.body
        if isinstance(body, bytes | bytearray):
            self.upload_bytes += len(body)
        elif hasattr(body, "seek") and hasattr(body, "tell"):  # a file-like body: its length
            here = body.tell()
            body.seek(0, os.SEEK_END)
            self.upload_bytes += body.tell() - here
            body.seek(here)

    def snapshot(self) -> dict[str, Any]:
        return {"requests": self.requests, "upload_bytes": self.upload_bytes, "by_method": dict(self.by_method)}


def counted_store(uri: str) -> tuple[Any, WireCounter]:
    from protein.storage import open_store

    store = open_store(uri)
    counter = WireCounter()
    store._client().meta.events.register("before-send.s3", counter)  # type: ignore[attr-defined]
    return store, counter


def measure(push: Any, data: Path, uri: str) -> dict[str, Any]:
    store, counter = counted_store(uri)
    started = time.perf_counter()
    try:
        push(str(data), store)
    finally:  # the process shares one client among its stores (s3_clients): stop counting on it
        store._client().meta.events.unregister("before-send.s3", counter)  # type: ignore[attr-defined]
    return {**counter.snapshot(), "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="train images of the first push")
    parser.add_argument("--added", type=int, default=500, help="train images the second push adds")
    parser.add_argument("--test-images", type=int, default=100)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--quick", action="store_true", help="200 + 50 images (smoke run)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    images, added, tests = (200, 50, 10) if args.quick else (args.images, args.added, args.test_images)

    from protein.data.push import push_dataset

    work = Path(tempfile.mkdtemp(prefix="bench-dataset-push-"))
    try:
        first = write_synthetic(work / "first", images, tests, args.size)
        second = write_synthetic(work / "second", images + added, tests, args.size)
        os.environ["PROTEIN_CACHE_DIR"] = str(work / "cache")
        with moto_server() as endpoint:
            os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                               "AWS_ENDPOINT_URL": endpoint})
            import boto3

            bucket = f"bench-{uuid.uuid4().hex[:10]}"
            boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
            raw: dict[str, Any] = {}
            for method, push in (("content-addressed", push_dataset), ("full copy", push_full_copy)):
                uri = f"s3://{bucket}/{method.replace(' ', '-')}"
                raw[method] = {"first": measure(push, first, uri), "second": measure(push, second, uri)}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    new, old = raw["content-addressed"]["second"], raw["full copy"]["second"]
    rows = [{"push": f"second (+{added} images)", "method": method, "requests": raw[method]["second"]["requests"],
             "uploaded_MB": raw[method]["second"]["upload_bytes"] / 1e6, "seconds": raw[method]["second"]["seconds"]}
            for method in raw]
    result = {
        "images": images, "added": added, "test_images": tests, "size_px": args.size,
        "second_push": {"content_addressed": new, "full_copy": old,
                        "bytes_ratio_full_over_cas": old["upload_bytes"] / max(1, new["upload_bytes"]),
                        "requests_ratio_full_over_cas": old["requests"] / max(1, new["requests"])},
        "raw": raw,
        "store": "moto_server over HTTP on 127.0.0.1; requests and body bytes counted by a botocore before-send hook",
        "machine": machine_info(),
    }
    path = write_json(args.out or results_path("dataset_push", args.quick), result)
    print(format_table(rows, ["push", "method", "requests", "uploaded_MB", "seconds"]))
    print(f"second push: full copy / content-addressed = {result['second_push']['bytes_ratio_full_over_cas']:.1f}x "
          f"bytes, {result['second_push']['requests_ratio_full_over_cas']:.1f}x requests")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
