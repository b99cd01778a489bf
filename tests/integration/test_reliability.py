"""Reliability: faults injected into training, the object store, concurrent runs and the input.

Each test injects one fault and checks what the user sees and what is lost; docs/reliability.md
tabulates them. Processes are real (`protein` subprocesses killed with SIGKILL), the S3 server is a
real moto_server (behind a fault-injecting proxy where a fault must land at an exact request), and
flows run under the session's Prefect harness.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import types
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from flows.params import GateParams, TrainParams, ValidationParams
from protein.config import TrainConfig
from protein.errors import IntegrityError, NotFound, PreconditionFailed, StoreError
from protein.modeling.train import load_checkpoint, metrics_key
from protein.pipeline import train_and_register
from protein.registry import CHAMPION_KEY, Registry
from protein.storage import open_store
from tests.conftest import MotoServer, ProteinProcess, running_moto_server, set_s3_env
from tests.helpers import module_scratch, one_torch_thread, write_dataset, write_png
from tests.integration.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

IMAGE = 32
# Every challenger passes the gate (min_rows=1: these datasets have a handful of holdout rows).
LENIENT = GateParams(min_score=0.0, min_gain=-1.0, max_class_drop=1.0, min_rows=1)
VALIDATION = ValidationParams(image_size=IMAGE)


def labels(n: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    return {str(i): " ".join(map(str, sorted(rng.sample(range(10), rng.randint(1, 2))))) for i in range(n)}


# One intra-op thread: on a shared 2-core machine OpenMP threads spinning against other load make an
# epoch anywhere from 2 s to 45 s; one thread is steady, and every run here uses the same count.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def last_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert result.returncode == code, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert needle in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if " error: " in line]) == 1, result.stderr[-2000:]


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("small") / "ds", labels(24), ["900", "901", "902"], size=IMAGE)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Flows and library calls without an explicit cache dir use this one, not ./work/cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(cache))
    return cache


# --- 1. resume -----------------------------------------------------------------------------------------

# The real CLI, instrumented only to report progress: one line per training batch, so the test can
# SIGKILL the process in the middle of an epoch however fast or slow this machine is today.
PROGRESS_RUNNER = """
import os, sys
import protein.modeling.train as train
from protein.cli import main

progress = open(os.environ["PROTEIN_TEST_PROGRESS"], "a", buffering=1)
iterate = train.iterate_batches

def counted(*args, **kwargs):
    for batch in iterate(*args, **kwargs):
        progress.write("batch\\n")
        yield batch

train.iterate_batches = counted
sys.exit(main(sys.argv[1:]))
"""


def read_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def resume_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 120 images, 96 in training, batch 4: 24 steps per epoch, so a kill can land inside one.
    return write_dataset(tmp_path_factory.mktemp("resume") / "ds", labels(120, seed=1), ["900"], size=IMAGE)


def test_sigkill_mid_epoch_then_rerun_resumes_and_matches_an_uninterrupted_run(resume_dataset, tmp_path,
                                                                              protein_process):
    from safetensors.torch import load_file

    epochs, batch = 3, 4
    cache = tmp_path / "cache"
    args = ["train", "--data", str(resume_dataset), "--cache-dir", str(cache), "--epochs", str(epochs),
            "--image-size", str(IMAGE), "--batch-size", str(batch), "--device", "cpu", "--seed", "7"]

    reference = protein_process.run(*args, "--store", str(tmp_path / "reference"), "--run-id", "reference",
                                    env=ONE_THREAD)
    assert reference.returncode == 0, reference.stderr
    reference_result = last_json(reference.stdout)
    assert reference_result["resumed_from_epoch"] == 0

    store = open_store(str(tmp_path / "store"))
    progress = tmp_path / "progress"
    spec = json.loads(open_store(str(tmp_path / "reference")).get_bytes(
        f"models/{reference_result['model_id']}/model.json"))
    # Training drops a ragged last batch (a batch of one image breaks BatchNorm).
    n_train = spec["holdout"]["n_train"]
    steps = n_train // batch if n_train >= batch else 1
    command = [sys.executable, "-c", PROGRESS_RUNNER, *args, "--store", store.uri, "--run-id", "killed"]
    env = {**os.environ, **ONE_THREAD, "PROTEIN_TEST_PROGRESS": str(progress)}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    epoch_one_at = None
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if epoch_one_at is None and store.exists(metrics_key("killed")):
                epoch_one_at = time.monotonic()  # epoch 1 checkpointed and recorded
            if epoch_one_at is not None and read_lines(progress) >= steps + steps // 2:
                break  # half of epoch 2's batches are done
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert epoch_one_at is not None, "epoch 1 was never recorded"
    # The kill landed inside epoch 2: one epoch checkpointed, epoch 2 partly trained.
    assert steps < read_lines(progress) < 2 * steps
    assert load_checkpoint(store, "killed")["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in store.get_bytes(metrics_key("killed")).splitlines()] == [1]
    lost_s = killed_at - epoch_one_at

    progress.unlink()
    started = time.monotonic()
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    rerun_s = time.monotonic() - started
    assert rerun.returncode == 0, rerun.stderr
    result = last_json(rerun.stdout)
    assert result["resumed_from_epoch"] == 1
    assert read_lines(progress) == (epochs - 1) * steps  # epoch 1 was not trained again
    resumed_spec = json.loads(store.get_bytes(f"models/{result['model_id']}/model.json"))
    assert [h["epoch"] for h in resumed_spec["history"]] == [1, 2, 3]

    # Same seed on CPU: the resumed run reproduces the uninterrupted one.
    ours = load_file(str(store.root / "models" / result["model_id"] / "model.safetensors"))
    theirs = load_file(str(tmp_path / "reference" / "models" / reference_result["model_id"] / "model.safetensors"))
    import torch

    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours if ours[k].numel())
    assert worst <= 1e-5, f"weights differ by up to {worst}"
    assert all(torch.allclose(ours[k].double(), theirs[k].double(), rtol=0, atol=1e-5) for k in ours)
    assert result["metrics"] == pytest.approx(reference_result["metrics"], abs=1e-6)
    for mine, ref in zip(resumed_spec["history"], spec["history"], strict=True):
        assert mine["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-5)
        assert mine["holdout_loss"] == pytest.approx(ref["holdout_loss"], rel=1e-5)
    epoch_s = max(h["train_seconds"] for h in resumed_spec["history"][1:])
    print(f"\nresume: killed {lost_s:.2f}s into epoch 2 (epoch ~{epoch_s:.2f}s), rerun {rerun_s:.1f}s, "
          f"max weight difference {worst:.3g}")


def without_retry_waits(monkeypatch: pytest.MonkeyPatch, flow_module: types.ModuleType) -> None:
    """Every task ``flow_module`` calls keeps its retries, minus the waits between them (up to
    2 + 10 + 30 s a task, 10 + 60 s for training): a test of a failure would wait them out."""
    from prefect import Task

    for name, value in vars(flow_module).items():
        if isinstance(value, Task) and value.retries:
            monkeypatch.setattr(flow_module, name, value.with_options(retry_delay_seconds=0))


def test_prefect_retry_of_the_train_task_resumes_after_the_last_checkpoint(
    prefect_harness, small_dataset, tmp_path, isolated_cache, single_torch_thread, monkeypatch
):
    import flows.retrain as retrain_module
    import protein.pipeline as pipeline

    attempts: list[dict[str, Any]] = []
    real = pipeline.train_and_register

    def crashes_once_after_epoch_one(*args: Any, on_epoch: Callable | None = None, **kwargs: Any) -> dict[str, Any]:
        attempt = {"number": len(attempts) + 1, "epochs_seen": []}
        attempts.append(attempt)

        def hook(record: dict[str, Any]) -> None:
            if on_epoch:
                on_epoch(record)
            attempt["epochs_seen"].append(record["epoch"])
            if attempt["number"] == 1 and record["epoch"] == 1:
                raise RuntimeError("simulated worker crash after epoch 1")

        attempt["result"] = real(*args, on_epoch=hook, **kwargs)
        return attempt["result"]

    monkeypatch.setattr(pipeline, "train_and_register", crashes_once_after_epoch_one)  # what train_model calls
    without_retry_waits(monkeypatch, retrain_module)  # same task, same retries, no 10 s wait

    store = str(tmp_path / "store")
    state = retrain_module.retrain(data=str(small_dataset), store=store, train=TrainParams(
        epochs=2, image_size=IMAGE, batch_size=8), gate_config=LENIENT, validation=VALIDATION, return_state=True)
    assert state.is_completed(), state.message
    assert [a["epochs_seen"] for a in attempts] == [[1], [2]]  # the retry trained epoch 2 only
    assert "result" not in attempts[0] and attempts[1]["result"]["resumed_from_epoch"] == 1
    result = state.result()
    registry = Registry(open_store(store))
    assert registry.champion().champion == result["challenger"] == attempts[1]["result"]["model_id"]
    assert [h["epoch"] for h in registry.spec(result["challenger"])["history"]] == [1, 2]
    assert registry.versions() == [result["challenger"]]  # the failed attempt registered nothing


# --- 2. storage faults ---------------------------------------------------------------------------------


def put_of(suffix: str) -> Callable[[str, str], bool]:
    return lambda method, path: method == "PUT" and urlsplit(path).path.endswith(suffix)


def upload_of(suffix: str, after_completed: int = 0) -> Callable[[str, str], bool]:
    """Matches a PUT (a whole object or one part) of a key ending in `suffix`, once `after_completed`
    uploads of it have finished: a single PUT, or a multipart upload's completing POST (a resnet18
    checkpoint with its optimizer state is over the 64 MiB multipart threshold)."""
    finished = 0

    def match(method: str, path: str) -> bool:
        nonlocal finished
        parts = urlsplit(path)
        if not parts.path.endswith(suffix):
            return False
        query = parse_qs(parts.query)
        if method == "PUT" and finished >= after_completed:
            return True
        if (method == "PUT" and "partNumber" not in query) or (method == "POST" and "uploadId" in query):
            finished += 1
        return False

    return match


@pytest.fixture(scope="module")
def fault_server() -> Iterator[MotoServer]:
    """A moto_server of our own: these tests stop and restart it, which empties it."""
    with running_moto_server() as server:
        yield server


def new_bucket() -> str:
    import boto3

    bucket = f"rel-{uuid.uuid4().hex[:12]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    return bucket


def bucket_keys(bucket: str) -> list[str]:
    import boto3

    pages = boto3.session.Session().client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture
def proxy(fault_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """boto3 pointed at a fault proxy in front of the module's own S3 server."""
    proxy = FaultProxy(fault_server.endpoint)
    proxy.start()
    set_s3_env(monkeypatch, proxy.endpoint)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.mark.parametrize("cut,resumes_from", [("checkpoint.pt", 1), ("model.safetensors", 2)])
def test_s3_dies_mid_upload_leaves_no_half_object_and_the_rerun_completes(
    proxy, small_dataset, tmp_path, single_torch_thread, cut, resumes_from, trainer
):
    bucket = new_bucket()
    uri = f"s3://{bucket}/p"
    registry = Registry(open_store(uri))
    champion = registry.register(champion_weights(tmp_path), {"arch": "resnet18", "image_size": IMAGE},
                                 version="champion-0")
    registry.promote(champion, expected_champion=None)
    pointer = open_store(uri).get_bytes(CHAMPION_KEY)

    config = TrainConfig(image_size=IMAGE, epochs=2, batch_size=8, device="cpu")
    # The checkpoint is written once per epoch: the second one (epoch 2) or the model's weights die.
    proxy.cut(upload_of(cut, after_completed=1 if cut == "checkpoint.pt" else 0))
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint"):
        trainer(small_dataset, uri, config, run_id="run-1", cache_dir=tmp_path / "cache")
    failed_after = time.monotonic() - started
    assert proxy.down

    proxy.start()  # the endpoint is back, with the server's state as the fault left it
    store = open_store(uri)
    keys = bucket_keys(bucket)
    assert sorted(k for k in keys if k.startswith("p/models/")) == sorted(
        [f"p/models/{champion}/model.safetensors", f"p/models/{champion}/model.json"])
    assert registry.versions() == [champion] and registry.orphans() == []
    assert store.get_bytes(CHAMPION_KEY) == pointer
    checkpoint = load_checkpoint(store, "run-1")  # whole, verified
    assert checkpoint["epoch"] == (1 if cut == "checkpoint.pt" else 2)
    # Epoch 1 of 2 keeps the optimizer's state to continue from; the last epoch's has none to keep.
    assert ("optimizer" in checkpoint) == (cut == "checkpoint.pt")

    result = trainer(small_dataset, uri, config, run_id="run-1", cache_dir=tmp_path / "cache")
    assert result["resumed_from_epoch"] == resumes_from
    assert registry.versions() == sorted([champion, result["model_id"]])
    assert store.get_bytes(CHAMPION_KEY) == pointer  # training never moves the pointer
    print(f"\nS3 down mid-upload of {cut}: failed after {failed_after:.1f}s, rerun resumed from epoch {resumes_from}")


def champion_weights(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    from protein.modeling.model import build_model

    path = tmp_path / "champion.safetensors"
    save_file({k: v.contiguous() for k, v in build_model("resnet18").state_dict().items()}, str(path))
    return path


def test_s3_down_before_a_run_fails_fast_then_a_restarted_server_completes_it(
    fault_server, small_dataset, tmp_path, monkeypatch, single_torch_thread, protein_process
):
    set_s3_env(monkeypatch, fault_server.endpoint)
    bucket = new_bucket()
    cache = tmp_path / "cache"
    args = ["train", "--data", str(small_dataset), "--store", f"s3://{bucket}/p", "--cache-dir", str(cache),
            "--epochs", "1", "--image-size", str(IMAGE), "--batch-size", "8", "--run-id", "run-1"]
    fault_server.stop()
    try:
        started = time.monotonic()
        down = protein_process.run(*args, env=ONE_THREAD)
        elapsed = time.monotonic() - started
    finally:
        fault_server.start()
    assert_one_line_error(down, 3, f"s3://{bucket}/p: cannot reach the S3 endpoint {fault_server.endpoint}")
    assert elapsed < 20, f"took {elapsed:.1f}s to report an unreachable store"
    assert not cache.exists()  # the store is checked before anything is decoded or trained

    # moto keeps everything in memory: the restarted server has no bucket until we recreate it.
    import boto3

    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
    up = cli(*args)
    assert up.returncode == 0, up.stderr
    assert last_json(up.stdout)["resumed_from_epoch"] == 0
    print(f"\nS3 down: CLI exit 3 after {elapsed:.1f}s (including interpreter and torch start-up)")


def test_retrain_flow_fails_when_s3_is_down(prefect_harness, fault_server, small_dataset, isolated_cache,
                                            monkeypatch):
    import flows.retrain as retrain_module

    set_s3_env(monkeypatch, fault_server.endpoint)
    bucket = new_bucket()
    without_retry_waits(monkeypatch, retrain_module)
    fault_server.stop()
    try:
        state = retrain_module.retrain(data=str(small_dataset), store=f"s3://{bucket}/p", train=TrainParams(
            epochs=1, image_size=IMAGE, batch_size=8), gate_config=LENIENT, validation=VALIDATION, return_state=True)
    finally:
        fault_server.start()
    assert state.is_failed()
    assert state.message.startswith(f"Flow run encountered an exception: StoreError: s3://{bucket}/p/")
    assert f"cannot reach the S3 endpoint {fault_server.endpoint}" in state.message
    # Nothing decoded or downloaded; only the content-hash cache of the local dataset (written by
    # fingerprinting it, before any store call) may exist.
    written = sorted(p.relative_to(isolated_cache).parts[:2] for p in isolated_cache.rglob("*") if p.is_file())
    assert all(parts == ("datasets", "hashes") for parts in written), written


def test_presigned_urls_are_sigv4(s3_bucket):
    """SigV2 presigning (boto3's default for S3) is deprecated; R2 and newer AWS regions refuse it."""
    import urllib.request

    store = open_store(s3_bucket)
    store.put_bytes("reports/a.txt", b"hello")
    url = store.url("reports/a.txt", expires_s=60)
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in url and "AWSAccessKeyId=" not in url
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"hello"


def test_transient_throttling_is_retried_with_bounded_attempts(proxy, tmp_path):
    uri = f"s3://{new_bucket()}/p"
    store = open_store(uri)
    store.check()
    weights = tmp_path / "w.bin"
    weights.write_bytes(os.urandom(256 * 1024))

    # Throttled or failing twice (or once), then answered: each call succeeds on a retry.
    get_a = lambda method, path: method == "GET" and urlsplit(path).path.endswith("/a.json")  # noqa: E731
    proxy.fail(put_of("/a.json"), times=2)
    proxy.fail(get_a, times=1, status=500, code="InternalError")
    proxy.fail(put_of("/w.bin"), times=1, status=503, code="ServiceUnavailable")
    store.put_bytes("a.json", b"{}")
    assert store.get_bytes("a.json") == b"{}"
    store.put_file("w.bin", weights)
    assert store.get_bytes("w.bin") == weights.read_bytes()
    assert proxy.count(put_of("/a.json")) == 3 and proxy.count(get_a) == 2 and proxy.count(put_of("/w.bin")) == 2

    # Throttled for good: the call gives up after S3_MAX_ATTEMPTS (3) with one clear line.
    proxy.fail(put_of("/b.json"), times=100)
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"S3 request PutObject failed \(SlowDown\)") as info:
        store.put_bytes("b.json", b"{}")
    assert str(info.value) == f"{uri}/b.json: S3 request PutObject failed (SlowDown)"
    assert proxy.count(put_of("/b.json")) == 3
    assert time.monotonic() - started < 10  # backoff: jittered, at most 1 s then 2 s

    # The bound is configurable: PROTEIN_S3_MAX_ATTEMPTS=2 allows two attempts.
    os.environ["PROTEIN_S3_MAX_ATTEMPTS"] = "2"
    try:
        with pytest.raises(StoreError, match="SlowDown"):
            open_store(uri).put_bytes("b.json", b"{}")
    finally:
        del os.environ["PROTEIN_S3_MAX_ATTEMPTS"]
    assert proxy.count(put_of("/b.json")) == 3 + 2
    assert not store.exists("b.json")


def test_lost_responses_are_recognised_as_success_on_retry(proxy, tmp_path):
    """A request that landed but whose answer was lost is retried by the client; the retry meets its own
    write (412) and must be reported as success, not as an existing version or a lost promotion."""
    bucket = new_bucket()
    registry = Registry(open_store(f"s3://{bucket}/p"))
    weights = champion_weights(tmp_path)
    a = registry.register(weights, {"arch": "resnet18", "image_size": IMAGE, "run_id": "run-a"}, version="a")
    registry.promote(a, expected_champion=None)

    proxy.lose_response(put_of("models/b/model.json"))
    b = registry.register(weights, {"arch": "resnet18", "image_size": IMAGE, "run_id": "run-b"}, version="b")
    assert b == "b" and proxy.count(put_of("models/b/model.json")) == 2  # it landed, then the retry met it
    assert registry.versions() == ["a", "b"] and registry.find_by_run("run-b") == "b"

    proxy.lose_response(put_of("registry/champion.json"))
    state = registry.promote(b, expected_champion=a, event_id="task-run-7")
    assert proxy.count(put_of("registry/champion.json")) == 3  # first champion, then the lost one and its retry
    assert state.champion == "b"
    assert [(e["model_id"], e["event_id"]) for e in registry.champion().history][1] == ("b", "task-run-7")
    # A Prefect retry of the same task run after all that: success again, no second event.
    assert registry.promote(b, expected_champion=a, event_id="task-run-7").champion == "b"
    assert len(registry.champion().history) == 2


def test_interrupted_multipart_upload_leaves_no_object_and_gc_removes_its_parts(proxy, tmp_path, monkeypatch):
    from protein.storage import s3 as s3_store

    monkeypatch.setattr(s3_store, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(s3_store, "MULTIPART_CHUNKSIZE", 5 * 1024 * 1024)
    monkeypatch.setattr(s3_store, "MULTIPART_WORKERS", 1)  # part 2 is cut after part 1 landed
    bucket = new_bucket()
    store = open_store(f"s3://{bucket}/p")
    big = tmp_path / "big.safetensors"
    big.write_bytes(os.urandom(11 * 1024 * 1024))
    proxy.cut(lambda method, path: method == "PUT" and "partNumber=2" in path)
    with pytest.raises(StoreError, match="cannot reach the S3 endpoint") as info:
        store.put_file("models/big/model.safetensors", big, if_none_match=True)
    assert "\n" not in str(info.value)
    proxy.start()
    assert bucket_keys(bucket) == []  # no half object: parts are invisible until completed
    assert Registry(store).orphans() == []
    assert store.clean_stale_uploads(older_than_s=0, dry_run=True) == 1  # the abort could not reach S3
    assert store.clean_stale_uploads(older_than_s=0) == 1
    assert store.clean_stale_uploads(older_than_s=0) == 0
    store.put_file("models/big/model.safetensors", big, if_none_match=True)  # a rerun completes
    assert store.etag("models/big/model.safetensors").strip('"').endswith("-3")
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.put_file("models/big/model.safetensors", big, if_none_match=True)


def test_stale_upload_cleanup_removes_only_uploads_older_than_the_age(proxy):
    """`models gc` aborts multipart uploads left by writers that died an hour ago, never one a live
    writer is sending now. (Through the proxy: moto itself dates every upload 2010.)"""
    import boto3

    bucket = new_bucket()
    store = open_store(f"s3://{bucket}/p")
    client = boto3.session.Session().client("s3")
    old = client.create_multipart_upload(Bucket=bucket, Key="p/runs/dead/checkpoint.pt")["UploadId"]
    fresh = client.create_multipart_upload(Bucket=bucket, Key="p/runs/live/checkpoint.pt")["UploadId"]
    proxy.backdate(old, 2 * 3600)

    assert store.clean_stale_uploads(older_than_s=3600, dry_run=True) == 1
    assert store.clean_stale_uploads(older_than_s=3600) == 1
    left = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [(u["Key"], u["UploadId"]) for u in left] == [("p/runs/live/checkpoint.pt", fresh)]
    assert store.clean_stale_uploads(older_than_s=3600) == 0


def test_a_download_broken_off_midway_is_one_store_error_and_leaves_no_file(proxy, tmp_path):
    bucket = new_bucket()
    store = open_store(f"s3://{bucket}/p")
    store.put_bytes("models/v/model.safetensors", os.urandom(300_000))
    proxy.truncate_response(lambda method, path: method == "GET" and path.split("?")[0].endswith("model.safetensors"))
    out = tmp_path / "dl" / "model.safetensors"
    with pytest.raises(StoreError, match="broke off the transfer") as info:
        store.get_file("models/v/model.safetensors", out)
    assert str(info.value) == (f"s3://{bucket}/p/models/v/model.safetensors: the S3 endpoint {proxy.endpoint} "
                               "broke off the transfer")
    assert not out.exists() and os.listdir(out.parent) == []
    store.get_file("models/v/model.safetensors", out)  # the next attempt is whole
    assert out.stat().st_size == 300_000


@pytest.mark.parametrize("ignored", ["If-None-Match", "If-Match"])
def test_check_refuses_an_endpoint_that_ignores_conditional_writes(proxy, monkeypatch, ignored):
    bucket = new_bucket()
    store = open_store(f"s3://{bucket}/p")
    store.check()  # moto honours both
    proxy.drop_headers = {ignored}
    with pytest.raises(StoreError, match=f"ignores {ignored} ") as info:
        store.check()
    message = str(info.value)
    assert message.startswith(f"s3://{bucket}/p: the S3 endpoint {proxy.endpoint} ignores {ignored} ")
    assert "PROTEIN_ALLOW_LAST_WRITER_WINS=1" in message and info.value.exit_code == 3
    monkeypatch.setenv("PROTEIN_ALLOW_LAST_WRITER_WINS", "1")
    store.check()  # the explicit opt-out
    assert bucket_keys(bucket) == []  # every probe was removed


# --- 3. concurrency ------------------------------------------------------------------------------------


def assert_history_is_one_line(store_uri: str) -> list[dict[str, Any]]:
    """Each promotion replaced the champion before it, and passed the gate against that champion."""
    store = open_store(store_uri)
    history = Registry(store).champion().history
    previous = None
    for event in history:
        assert event["action"] == "promote"
        assert event["previous"] == previous, history
        if previous is not None:  # the seeded first champion had no gate
            gate = json.loads(store.get_bytes(f"gates/{event['model_id']}.json"))
            assert gate["decision"]["promote"] is True and gate["champion"] == previous, gate
        previous = event["model_id"]
    assert Registry(store).champion().champion == previous
    return history


def promote_attempts(flow_run_id: Any) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    [promote] = [r for r in runs if r.name.startswith("promote-model")]
    return promote.run_count


def test_two_retrains_racing_on_one_store_leave_one_line_of_history(
    prefect_harness, small_dataset, tmp_path, isolated_cache, single_torch_thread, monkeypatch
):
    import flows.retrain as retrain_module

    store = str(tmp_path / "store")
    seeded = train_and_register(small_dataset, store, TrainConfig(image_size=IMAGE, epochs=1, batch_size=8, seed=9),
                                run_id="seed-run")["model_id"]
    Registry(open_store(store)).promote(seeded, expected_champion=None)

    # Both runs judge their challenger against the same champion before either promotes: the
    # interleaving that makes a naive read-then-write promotion lose an update.
    both_gated = threading.Barrier(2, timeout=180)
    promote_task = retrain_module.promote_model

    def promote_after_both_gates(*args: Any, **kwargs: Any) -> dict[str, Any]:
        both_gated.wait()
        return promote_task(*args, **kwargs)

    monkeypatch.setattr(retrain_module, "promote_model", promote_after_both_gates)

    def run(lr: float) -> Any:
        # The champion's seed, hence its split: the gate then has its whole holdout to compare on
        # (with another split almost every holdout row is one the champion trained on).
        return retrain_module.retrain(data=str(small_dataset), store=store, train=TrainParams(
            epochs=1, image_size=IMAGE, batch_size=8, seed=9, lr=lr), gate_config=LENIENT, validation=VALIDATION,
            return_state=True)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        states = list(pool.map(run, [1e-3, 2e-3]))

    won = [s for s in states if s.is_completed()]
    lost = [s for s in states if s.is_failed()]
    assert len(won) == 1 and len(lost) == 1, [s.message for s in states]
    assert "PromotionConflict" in lost[0].message and "nothing was changed" in lost[0].message
    assert promote_attempts(lost[0].state_details.flow_run_id) == 1  # a lost swap is a decision: no retry
    winner = won[0].result()
    history = assert_history_is_one_line(store)
    assert [(e["model_id"], e["previous"]) for e in history] == [(seeded, None), (winner["challenger"], seeded)]

    # The loser's challenger stays a complete, immutable version that never served; gc keeps it.
    registry = Registry(open_store(store))
    losers = set(registry.versions()) - {seeded, winner["challenger"]}
    assert len(losers) == 1 and registry.orphans() == []


# --- 4. atomicity --------------------------------------------------------------------------------------

WRITER = """
import sys, tempfile
from pathlib import Path
from protein.atomic import write_bytes_atomic
from protein.storage import open_store

store, out = open_store(sys.argv[1]), Path(sys.argv[2])
source = Path(tempfile.mkdtemp(dir=sys.argv[3])) / "weights"  # the test's folder: this process is killed
i = 0
while True:
    i += 1
    payload = f"{i}:".encode().ljust(16) + bytes([i % 251]) * (400_000 + 50_000 * (i % 9))
    store.put_bytes("registry/champion.json", payload)       # a pointer, rewritten in place
    source.write_bytes(payload)
    store.put_file("models/v/model.safetensors", source)     # a large object from a file
    write_bytes_atomic(out, payload)                          # a local output (submission, report)
"""


def whole(payload: bytes) -> bool:
    """True if `payload` is one complete write of WRITER."""
    i = int(payload[:16].split(b":")[0])
    body = payload[16:]
    return len(body) == 400_000 + 50_000 * (i % 9) and body == bytes([i % 251]) * len(body)


def test_sigkilled_writer_leaves_every_object_whole_or_absent(tmp_path, protein_process: ProteinProcess):
    store = open_store(str(tmp_path / "store"))
    out = tmp_path / "out" / "submission.csv"
    keys = ["registry/champion.json", "models/v/model.safetensors"]
    stop = threading.Event()
    partial: list[str] = []
    integrity: list[str] = []

    failures: list[str] = []
    seen: set[str] = set()

    def reader() -> None:  # reads race the writer the whole time
        while not stop.is_set():
            for key in keys:
                try:
                    if not whole(store.get_bytes(key)):
                        partial.append(key)
                    seen.add(key)
                except IntegrityError:  # the documented crash window: refused, never wrong bytes
                    integrity.append(key)
                except NotFound:
                    if key in seen:  # an object, once written, never disappears
                        failures.append(f"{key}: vanished after it was read")
                except Exception as exc:  # any other read failure fails the test, never passes silently
                    failures.append(f"{key}: {type(exc).__name__}: {exc}")
            try:
                if out.exists() and not whole(out.read_bytes()):
                    partial.append(str(out))
            except FileNotFoundError:
                failures.append(f"{out}: vanished after it existed")

    rng = random.Random(0)
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for _ in range(6):
            writer = protein_process.start_script(WRITER, store.uri, str(out), str(tmp_path))
            deadline = time.monotonic() + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.4))
            writer.send_signal(signal.SIGKILL)
            writer.wait()
            for key in keys:
                assert whole((store.root / key).read_bytes()), key  # on disk: an old or a new object
            assert whole(out.read_bytes())
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert partial == []
    assert seen == set(keys)  # the reader really read both objects while the writer ran
    assert store.list() == sorted(keys)  # temp files are never listed as objects
    for key in keys:
        try:
            assert whole(store.get_bytes(key))
        except IntegrityError:
            integrity.append(key)
    print(f"\natomic writes: 6 SIGKILLs, 0 partial reads, {len(integrity)} reads refused by the checksum")


# A real crash between registering a model version and moving the champion pointer.
CRASH_BEFORE_MODEL_JSON = """
import os, signal, sys
from protein.storage import LocalStore
from protein.cli import main

put = LocalStore.put_bytes

def put_then_die(self, key, data, **kwargs):
    if key.endswith("/model.json"):
        os.kill(os.getpid(), signal.SIGKILL)  # weights are uploaded, model.json never is
    return put(self, key, data, **kwargs)

LocalStore.put_bytes = put_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_crash_during_registration_leaves_an_orphan_that_gc_lists_and_removes(small_dataset, tmp_path,
                                                                              protein_process):
    store = open_store(str(tmp_path / "store"))
    registry = Registry(store)
    champion = registry.register(champion_weights(tmp_path), {"arch": "resnet18", "image_size": IMAGE},
                                 version="champion-0")
    registry.promote(champion, expected_champion=None)
    pointer = store.get_bytes(CHAMPION_KEY)

    args = ["train", "--data", str(small_dataset), "--store", store.uri, "--cache-dir", str(tmp_path / "cache"),
            "--epochs", "1", "--image-size", str(IMAGE), "--batch-size", "8", "--run-id", "run-1"]
    crashed = protein_process.python(CRASH_BEFORE_MODEL_JSON, *args, env=ONE_THREAD)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    orphans = registry.orphans()
    assert len(orphans) == 1 and store.exists(f"models/{orphans[0]}/model.safetensors")
    assert registry.versions() == [champion] and store.get_bytes(CHAMPION_KEY) == pointer
    listed = cli("models", "list", "--json", "--store", store.uri)
    assert [row["id"] for row in json.loads(listed.stdout)] == [champion]

    # Seconds old: it could be a registration still in progress, so the default threshold keeps it.
    young = cli("models", "gc", "--store", store.uri)
    assert young.returncode == 0
    assert json.loads(young.stdout) == {"orphans": [], "stale_uploads": 0, "deleted": True}
    assert registry.orphans() == orphans
    dry = cli("models", "gc", "--dry-run", "--older-than-hours", "0", "--store", store.uri)
    assert dry.returncode == 0
    assert json.loads(dry.stdout) == {"orphans": orphans, "stale_uploads": 0, "deleted": False}
    assert registry.orphans() == orphans
    gc = cli("models", "gc", "--older-than-hours", "0", "--store", store.uri)
    assert gc.returncode == 0
    assert json.loads(gc.stdout) == {"orphans": orphans, "stale_uploads": 0, "deleted": True}
    assert registry.orphans() == [] and not store.list(f"models/{orphans[0]}/")
    assert registry.versions() == [champion] and store.get_bytes(CHAMPION_KEY) == pointer

    # The run's last checkpoint survived the crash: the rerun registers without training again.
    rerun = cli(*args)
    assert rerun.returncode == 0, rerun.stderr
    result = last_json(rerun.stdout)
    assert result["resumed_from_epoch"] == 1
    assert registry.versions() == sorted([champion, result["model_id"]]) and registry.orphans() == []


def test_crash_between_checksum_and_object_rename_is_refused_not_misread(tmp_path, monkeypatch):
    """LocalStore renames the checksum sidecar, then the object. A crash between the two leaves the
    old object whole on disk and a checksum for the new one: reads refuse it (IntegrityError) rather
    than serve bytes nobody verified, and the next write of the key heals it."""
    from protein.storage import local as local_store

    store = open_store(str(tmp_path / "store"))
    store.put_bytes("registry/champion.json", b"old")

    def crash_on_object_rename(src: Any, dst: Any) -> None:
        if str(dst) == str(store.root / "registry/champion.json"):
            raise KeyboardInterrupt("simulated crash")
        os.replace(src, dst)

    # Only the store module sees the crashing rename (its global `os` becomes a stand-in that
    # delegates everything else): os.replace itself, which every other thread uses, is untouched.
    crashing_os = types.SimpleNamespace(**vars(os))
    crashing_os.replace = crash_on_object_rename
    with monkeypatch.context() as patch:
        patch.setattr(local_store, "os", crashing_os)
        with pytest.raises(KeyboardInterrupt, match="simulated crash"):
            store.put_bytes("registry/champion.json", b"new")
    assert (store.root / "registry/champion.json").read_bytes() == b"old"
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.get_bytes("registry/champion.json")
    store.put_bytes("registry/champion.json", b"new")
    assert store.get_bytes("registry/champion.json") == b"new"


# --- 5. hostile and broken input -----------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The `protein` entry point in this process (no interpreter start-up): same exit codes and
    stderr lines; an exception escaping main() (a traceback for a user) fails the test."""
    import contextlib
    import warnings

    from protein.cli import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out), \
            contextlib.redirect_stderr(err):
        warnings.simplefilter("always")
        code = main(list(args))
    noise = [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue() + "".join(noise))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int, pixels: bool = True) -> bytes:
    """A side x side RGB PNG of zeros: a few hundred KB that would decode to side*side*3 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush() if pixels else b"x"
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def replace_image(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda ds: (ds / "train" / name).write_bytes(data)


def symlink_outside(ds: Path) -> None:
    outside = ds.parent / "private.png"
    write_png(outside)
    (ds / "train" / "5.png").unlink()
    (ds / "train" / "5.png").symlink_to(outside)


def with_id(image_id: str) -> Callable[[Path], None]:
    def mutate(ds: Path) -> None:
        write_png(ds / "train" / "ok.png")
        quoted = '"' + image_id.replace('"', '""') + '"'
        (ds / "train.csv").write_text(f"Image,Label\nok,0\n{quoted},1\n", encoding="utf-8")

    return mutate


def valid_png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (IMAGE, IMAGE), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


HOSTILE_TRAIN_INPUT = {
    "png-10000x10000": (replace_image("5.png", bomb_png(10_000)), "train/5.png: 10000x10000 pixels exceeds "
                        "the 16,777,216-pixel limit (decompression-bomb guard)"),
    "png-20000x20000": (replace_image("5.png", bomb_png(20_000, pixels=False)),
                        "train/5.png: 20000x20000 pixels exceeds the 16,777,216-pixel limit"),
    "png-trailing-garbage": (replace_image("5.png", valid_png_bytes() + b"<?php system($_GET['c']); ?>"),
                             "train/5.png: 28 bytes of trailing data after the IEND chunk"),
    "png-glued-to-a-zip": (replace_image("5.png", valid_png_bytes() + b"PK\x03\x04" + b"\0" * 60),
                           "train/5.png: 64 bytes of trailing data after the IEND chunk"),
    "symlink-outside": (symlink_outside, "train/5.png: points outside the dataset folder"),
    "id-unicode": (with_id("é1"), "image id 'é1' is not a safe id"),
    "id-shell-substitution": (with_id("$(touch PWNED)"), "image id '$(touch PWNED)' is not a safe id"),
    "id-backticks-and-semicolon": (with_id("`touch PWNED`;rm -rf ~"), "is not a safe id"),
    "id-path": (with_id("../../etc/passwd"), "image id '../../etc/passwd' is not a safe id"),
    "id-bidi-override": (with_id("12\u202e3"), "is not a safe id"),
    "id-fullwidth-digits": (with_id("\uff11\uff12"), "is not a safe id"),
}


@pytest.mark.parametrize("case", HOSTILE_TRAIN_INPUT)
def test_hostile_dataset_is_refused_with_one_line_and_exit_2(case, tmp_path, monkeypatch):
    mutate, needle = HOSTILE_TRAIN_INPUT[case]
    dataset = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["900"], size=IMAGE)
    mutate(dataset)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    result = cli("train", "--data", str(dataset), "--store", str(store), "--cache-dir", str(tmp_path / "cache"),
                 "--epochs", "1", "--image-size", str(IMAGE))
    assert_one_line_error(result, 2, needle)
    assert len(result.stderr.splitlines()) == 1  # no warning either (PIL warns about big images)
    assert not (store / "models").exists() and not (store / "runs").exists()
    assert not list(tmp_path.rglob("PWNED"))
    assert not list(tmp_path.glob("cache/*.npy"))


def test_hostile_images_fail_validation_naming_each_file(tmp_path):
    dataset = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["900"], size=IMAGE)
    symlink_outside(dataset)  # train/5.png
    (dataset / "train" / "6.png").write_bytes(bomb_png(10_000))
    (dataset / "train" / "7.png").write_bytes(valid_png_bytes() + b"trailing")
    result = cli("validate", "--data", str(dataset), "--store", str(tmp_path / "store"),
                 "--image-size", str(IMAGE))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["success"] is False
    for needle in ("train/5.png row 7 (cannot read: points outside the dataset folder",
                   "train/6.png row 8 = '10000x10000'",
                   "train/7.png row 9 = False (data after the IEND chunk (trailing garbage))"):
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "store" / "models").exists()


def zip_with(member: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        archive = tmp / "competition.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("train.csv", "Image,Label\n1,0\n")
            zf.writestr("train/1.png", valid_png_bytes())
            zf.writestr(member, b"evil")
        return archive

    return build


@pytest.mark.parametrize("member", ["../evil.png", "train/../../evil.png", "/etc/cron.d/evil", "C:/evil.png",
                                    "train\\..\\..\\evil.png"])
def test_zip_with_escaping_member_names_is_refused(member, tmp_path):
    archive = zip_with(member)(tmp_path)
    for verb in ("train", "validate"):
        result = cli(verb, "--data", str(archive), "--store", str(tmp_path / "store"),
                     *(["--cache-dir", str(tmp_path / "cache")] if verb == "train" else []))
        assert_one_line_error(result, 2, f"unsafe member name {member!r}")
    assert not (tmp_path / "store").exists() and not (tmp_path.parent / "evil.png").exists()


@pytest.fixture(scope="module")
def served_store(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path,
                 trainer: Callable[..., dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A store with a promoted champion, for the prediction side."""
    with module_scratch(tmp_path_factory, "served") as root:
        with one_torch_thread():
            result = trainer(small_dataset, str(root / "store"), TrainConfig(
                image_size=IMAGE, epochs=1, batch_size=8), run_id="served", cache_dir=root / "cache")
        Registry(open_store(str(root / "store"))).promote(result["model_id"], expected_champion=None)
        yield {"store": str(root / "store"), "model_id": result["model_id"], "cache": root / "cache"}


def test_model_json_claiming_another_architecture_is_refused_by_predict(served_store, small_dataset, tmp_path):
    store = open_store(served_store["store"])
    registry = Registry(store)
    local = registry.download(served_store["model_id"], tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    # Registered through the normal path, so every checksum is right: only the claim is false.
    liar = registry.register(local / "model.safetensors", {**{k: spec[k] for k in (
        "image_size", "normalization", "class_names", "thresholds", "metrics")}, "arch": "resnet34"},
        version="liar-resnet34")
    pointer = store.get_bytes(CHAMPION_KEY)
    for verb in ("predict", "evaluate"):
        result = cli(verb, "--data", str(small_dataset), "--store", store.uri, "--cache-dir", str(tmp_path / "c"),
                     "--model", liar)
        assert_one_line_error(result, 4, f"{liar}: weights do not match architecture 'resnet34'")
    assert store.get_bytes(CHAMPION_KEY) == pointer
    assert not store.list(f"submissions/{liar}/")


@pytest.mark.parametrize("case", ["png-trailing-garbage", "id-shell-substitution"])
def test_hostile_test_set_is_refused_by_predict(case, served_store, small_dataset, tmp_path):
    dataset = tmp_path / "ds"
    import shutil

    shutil.copytree(small_dataset, dataset)
    if case == "png-trailing-garbage":
        (dataset / "test" / "901.png").write_bytes(valid_png_bytes() + b"\0" * 7)
        needle = "test/901.png: 7 bytes of trailing data after the IEND chunk"
    else:
        (dataset / "sample_submission.csv").write_text("Image,Label\n900,0\n$(touch PWNED),0\n")
        needle = "image id '$(touch PWNED)' is not a safe id"
    store = open_store(served_store["store"])
    before = store.list("submissions/")
    result = cli("predict", "--data", str(dataset), "--store", store.uri, "--cache-dir", str(tmp_path / "c"),
                 "--out", str(tmp_path / "submission.csv"))
    assert_one_line_error(result, 2, needle)
    assert store.list("submissions/") == before and not (tmp_path / "submission.csv").exists()


def test_million_row_train_csv_is_bounded_in_memory_and_time(tmp_path, protein_process: ProteinProcess):
    dataset = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["900"], size=IMAGE)
    with open(dataset / "train.csv", "w") as f:
        f.write("Image,Label\n")
        f.writelines(f"{i},{i % 10}\n" for i in range(1_000_000))
    command = [sys.executable, "-m", "protein.cli", "train", "--data", str(dataset), "--store",
               str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), "--image-size", str(IMAGE)]
    _, _, idle = run_measured(protein_process, [sys.executable, "-c", "import protein.pipeline, protein.cli"])
    started = time.monotonic()
    code, stderr, peak = run_measured(protein_process, command)
    elapsed = time.monotonic() - started
    # 8 of the million images exist: the first missing one ends the run, with one line.
    assert code == 2, stderr[-2000:]
    assert "train/8.png: file not found" in stderr and "Traceback" not in stderr
    assert peak - idle < 1024, f"peak RSS {peak:.0f} MiB, {peak - idle:.0f} MiB over an idle import"
    assert not (tmp_path / "store" / "models").exists()
    assert not list((tmp_path / "cache").glob("*.npy"))  # the 3 GB sparse cache file was removed
    print(f"\n1,000,000-row train.csv: exit 2 after {elapsed:.1f}s, peak RSS {peak:.0f} MiB "
          f"(idle import {idle:.0f} MiB)")


# Runs the command as its child and reports the child's own peak RSS. A process forked straight
# from pytest would report pytest's size as its peak (Linux keeps the pre-exec high-water mark).
MEASURE = """
import json, os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "peak_kib": usage.ru_maxrss}))
"""


def run_measured(process: ProteinProcess, command: list[str], timeout: float = 180) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS in MiB of one process."""
    try:
        result = process.python(MEASURE, *command, env=ONE_THREAD, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} still running after {timeout}s (a hang)")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["code"], result.stderr, report["peak_kib"] / 1024


# --- 6. secrets ----------------------------------------------------------------------------------------

FAKE_KEY_ID = "AKIAFAKEPROTEIN0001"
FAKE_SECRET = "SECRETfakeProtein0123456789"
FAKE_TOKEN = "TOKENfakeProteinSession0123456789"
# The Prefect API's basic-auth string and the alert webhook's URL (docs/security.md): secrets every
# worker holds in its environment.
FAKE_AUTH = "admin:AUTHfakeProteinPrefect0123456789"
FAKE_WEBHOOK = "https://hooks.example.invalid/services/WEBHOOKfakeProtein0123456789"
SECRETS = {"secret": FAKE_SECRET, "auth string": FAKE_AUTH.split(":", 1)[1], "webhook": "WEBHOOKfakeProtein0123456789"}
# A presigned URL names the access key id (SigV4: X-Amz-Credential=<key id>/<date>/...; SigV2:
# AWSAccessKeyId=) and grants whoever reads it access to the object. None may be persisted anywhere:
# links are durable s3:// URIs, presigned only on demand by `protein link` (docs/security.md).
PRESIGN_MARKERS = ("X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId=")


def leaks(where: str, text: str | bytes, found: dict[str, list[str]]) -> None:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    for kind, value in SECRETS.items():
        if value in text:
            found["secret"].append(f"{kind} in {where}")
    if any(marker in text for marker in PRESIGN_MARKERS):
        found["presigned"].append(where)
    if FAKE_TOKEN in text:
        found["token"].append(where)
    scrubbed = text
    if FAKE_KEY_ID in scrubbed:
        at = scrubbed.index(FAKE_KEY_ID)
        found["key_id"].append(f"{where}: ...{scrubbed[max(0, at - 80):at + 40]}...")


def prefect_records(flow_run_ids: list[Any]) -> Iterator[tuple[str, str]]:
    """Everything the Prefect API keeps about these runs: logs, artifacts, states, parameters."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    with get_client(sync_client=True) as client:
        offset = 0
        while batch := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)),
                                        limit=200, offset=offset):
            offset += len(batch)
            for log in batch:
                yield f"prefect log: {log.message[:60]}", log.message
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=flow_run_ids)))
        for artifact in artifacts:
            yield f"artifact {artifact.key}", f"{artifact.data} {artifact.description}"
        runs = FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids))
        for run in client.read_flow_runs(flow_run_filter=runs):
            yield f"flow run {run.name}", f"{run.parameters} {run.state and run.state.message}"
        for task_run in client.read_task_runs(flow_run_filter=runs):
            yield f"task run {task_run.name}", str(task_run.state and task_run.state.message)


def files_under(root: Path) -> Iterator[Path]:
    return (p for p in Path(root).rglob("*") if p.is_file() and not p.is_symlink())


def handler_format(record: logging.LogRecord) -> str:
    """The message with its exception and stack, as any handler would write it."""
    return logging.Formatter("%(name)s %(message)s").format(record)


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    """Every record any logger emits, protein's at DEBUG. caplog's handler does not survive Prefect's
    logging set-up, which replaces the root logger's handlers unless one of them has a formatter."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler, root, ours = Collect(logging.DEBUG), logging.getLogger(), logging.getLogger("protein")
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    level = ours.level
    root.addHandler(handler)
    ours.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        ours.setLevel(level)


@pytest.fixture
def prefect_auth_string(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Clients hold the Prefect API's auth string: subprocesses in the environment, this process in settings
    (the session's harness server has no auth, so it ignores the header)."""
    import prefect.settings

    monkeypatch.setenv("PREFECT_API_AUTH_STRING", FAKE_AUTH)
    with prefect.settings.temporary_settings(updates={prefect.settings.PREFECT_API_AUTH_STRING: FAKE_AUTH}):
        yield FAKE_AUTH


def test_credentials_appear_in_no_log_artifact_report_message_or_file(
    prefect_harness, s3_server, small_dataset, tmp_path, isolated_cache, single_torch_thread, monkeypatch, log_records,
    prefect_auth_string, protein_process,
):
    import tempfile

    import boto3
    import prefect.settings

    import flows.retrain as retrain_module

    set_s3_env(monkeypatch, s3_server.endpoint, FAKE_KEY_ID, FAKE_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)  # temporary credentials, as a role would have
    monkeypatch.setenv("PROTEIN_ALERT_WEBHOOK_URL", FAKE_WEBHOOK)
    assert prefect.settings.PREFECT_API_AUTH_STRING.value() == prefect_auth_string
    work_tmp = tmp_path / "tmp"
    work_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work_tmp))  # validation reports, model downloads
    without_retry_waits(monkeypatch, retrain_module)
    bucket = f"secrets-{uuid.uuid4().hex[:10]}"
    boto3.session.Session().client("s3").create_bucket(Bucket=bucket)

    train = TrainParams(epochs=1, image_size=IMAGE, batch_size=8)
    ok = retrain_module.retrain(data=str(small_dataset), store=f"s3://{bucket}/p", train=train,
                                gate_config=LENIENT, validation=VALIDATION, return_state=True)
    assert ok.is_completed(), ok.message
    # A failing run too: error messages are built from URIs and codes, never from credentials.
    missing = retrain_module.retrain(data=str(small_dataset), store="s3://no-such-bucket-secrets/p", train=train,
                                     gate_config=LENIENT, validation=VALIDATION, return_state=True)
    assert missing.is_failed() and "does not exist" in missing.message
    cli_error = protein_process.run("models", "list", "--store", "s3://no-such-bucket-secrets/p", env=ONE_THREAD)
    assert cli_error.returncode == 3

    found: dict[str, list[str]] = {"secret": [], "token": [], "key_id": [], "presigned": []}
    assert any(r.name.startswith("protein.") for r in log_records)
    assert any(r.name.startswith("prefect.task_runs") for r in log_records)
    for record in log_records:
        leaks(f"log {record.name}", handler_format(record), found)
    leaks("flow state messages", f"{ok.message} {missing.message}", found)
    leaks("cli stderr", cli_error.stdout + cli_error.stderr, found)
    flow_run_ids = [ok.state_details.flow_run_id, missing.state_details.flow_run_id]
    records = list(prefect_records(flow_run_ids))
    assert any(where.startswith("artifact ") for where, _ in records)
    assert any(where.startswith("prefect log") for where, _ in records)
    for where, text in records:
        leaks(where, text, found)
    client = boto3.session.Session().client("s3")
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.endswith("model.safetensors") for k in objects) and any("report.json" in k for k in objects)
    for key in objects:
        leaks(f"s3 object {key}", client.get_object(Bucket=bucket, Key=key)["Body"].read(), found)
    database = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1]).parent
    roots = [tmp_path, Path(os.environ["PREFECT_HOME"]), database]
    scanned = 0
    for root in roots:
        for path in files_under(root):
            leaks(f"file {path}", path.read_bytes(), found)
            scanned += 1
    assert scanned > 10

    assert found["secret"] == [], found["secret"]
    assert found["token"] == [], found["token"]
    assert found["key_id"] == [], found["key_id"]
    assert found["presigned"] == [], f"presigned URLs persisted in: {found['presigned']}"
    print(f"\nsecrets: scanned {len(log_records)} log records, {len(records)} Prefect API records, "
          f"{len(objects)} S3 objects, {scanned} files; no presigned URL in any")
