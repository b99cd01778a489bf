"""The object store failing under a run: S3 down or cut off mid-upload, throttling, lost responses,
interrupted multipart uploads, a download broken off, an endpoint that ignores conditional writes.
A real moto_server, behind a fault-injecting proxy where a fault must land at an exact request."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import pytest

from flows.params import TrainParams
from protein.config import TrainConfig
from protein.errors import PreconditionFailed, StoreError
from protein.modeling.checkpoints import load_checkpoint
from protein.registry import CHAMPION_KEY, Registry
from protein.storage import open_store
from tests.conftest import MotoServer, running_moto_server, set_s3_env
from tests.integration.fault_proxy import FaultProxy
from tests.integration.reliability_common import (
    IMAGE,
    LENIENT,
    ONE_THREAD,
    VALIDATION,
    assert_one_line_error,
    champion_weights,
    cli,
    last_json,
    without_retry_waits,
)

pytestmark = pytest.mark.integration


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
