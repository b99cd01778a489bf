"""The object store against a local folder and a real S3 server (moto_server over HTTP).

Both backends run the same suite through `open_store`, the path users take.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from protein import storage
from protein.errors import IntegrityError, NotFound, PreconditionFailed, StoreError
from protein.storage import LocalStore, S3Store, Store, open_store, validate_key

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_bucket"))


def raw_s3(store: Store) -> tuple[Any, str, str]:
    """A plain boto3 client, the bucket and the object-key prefix: for writing behind the store's back."""
    import boto3

    assert isinstance(store, S3Store)
    return boto3.session.Session().client("s3"), store.bucket, f"{store.prefix}/"


def write_behind_back(store: Store, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Replace an object's bytes the way another tool (or bit rot) would, leaving recorded hashes alone."""
    if isinstance(store, LocalStore):
        path = store.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    else:
        client, bucket, prefix = raw_s3(store)
        client.put_object(Bucket=bucket, Key=prefix + key, Body=data, Metadata=metadata or {})


# --- round trips -------------------------------------------------------------------------------------


def test_bytes_round_trip(store: Store) -> None:
    assert not store.exists("models/v1/meta.json")
    assert store.etag("models/v1/meta.json") is None

    token = store.put_bytes("models/v1/meta.json", b'{"a": 1}', content_type="application/json")

    assert store.get_bytes("models/v1/meta.json") == b'{"a": 1}'
    assert store.exists("models/v1/meta.json")
    assert store.etag("models/v1/meta.json") == token
    # Overwrite without conditions just replaces, with a new token.
    token2 = store.put_bytes("models/v1/meta.json", b'{"a": 2}')
    assert token2 != token
    assert store.get_bytes("models/v1/meta.json") == b'{"a": 2}'


def test_missing_object(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="missing/key"):
        store.get_bytes("missing/key")
    with pytest.raises(NotFound, match="missing/key"):
        store.get_file("missing/key", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert not store.exists("missing/key")
    assert store.etag("missing/key") is None
    store.delete("missing/key")  # idempotent


def test_file_round_trip_multipart(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 5 MiB is S3's smallest allowed part; 9 MiB then means two parts.
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(storage.s3, "MULTIPART_CHUNKSIZE", 5 * MiB)
    source = tmp_path / "model.safetensors"
    payload = os.urandom(9 * MiB + 123)
    source.write_bytes(payload)

    store.put_file("models/x/model.safetensors", source)

    if isinstance(store, S3Store):
        etag = store.etag("models/x/model.safetensors")
        assert etag is not None and etag.strip('"').endswith("-2"), f"not a 2-part upload: {etag}"
    out_dir = tmp_path / "download" / "nested"
    store.get_file("models/x/model.safetensors", out_dir / "model.safetensors")
    assert (out_dir / "model.safetensors").read_bytes() == payload
    assert os.listdir(out_dir) == ["model.safetensors"]  # no temp file left beside it
    assert store.get_bytes("models/x/model.safetensors") == payload


def test_put_file_missing_source_is_callers_error(store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        store.put_file("x", tmp_path / "nope.bin")
    assert not store.exists("x")


# --- listing and deleting ------------------------------------------------------------------------------


def test_list_and_delete(store: Store) -> None:
    assert store.list() == []
    for key in ("a/1", "a/2", "a/sub/3", "ab", "b/1"):
        store.put_bytes(key, key.encode())

    assert store.list() == ["a/1", "a/2", "a/sub/3", "ab", "b/1"]
    assert store.list("a/") == ["a/1", "a/2", "a/sub/3"]
    assert store.list("a") == ["a/1", "a/2", "a/sub/3", "ab"]  # a string prefix, like S3
    assert store.list("a/s") == ["a/sub/3"]
    assert store.list("zzz/") == []

    store.delete("a/1")
    store.delete("a/1")
    assert not store.exists("a/1")
    assert store.list("a/") == ["a/2", "a/sub/3"]

    assert store.delete_prefix("a/") == 2
    assert store.list() == ["ab", "b/1"]
    assert store.delete_prefix("a/") == 0
    with pytest.raises(ValueError, match="non-empty"):
        store.delete_prefix("")
    # A key can reuse a name that was a folder before its contents were deleted.
    store.put_bytes("a", b"now a file")
    assert store.get_bytes("a") == b"now a file"


def test_list_hides_internal_files(store: Store) -> None:
    store.put_bytes("models/m.bin", b"x")
    store.put_bytes("models/m.bin.sha256", b"a key that looks like a sidecar is still a key")
    if isinstance(store, LocalStore):
        on_disk = {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()}
        assert any(p.startswith(storage.LOCAL_META_DIR + "/") for p in on_disk)  # sidecars and lock exist
    else:
        client, bucket, prefix = raw_s3(store)
        head = client.head_object(Bucket=bucket, Key=prefix + "models/m.bin")
        assert len(head["Metadata"]["sha256"]) == 64
        # A "folder" marker other tools create is not a key.
        client.put_object(Bucket=bucket, Key=prefix + "models/", Body=b"")
    assert store.list() == ["models/m.bin", "models/m.bin.sha256"]
    assert store.get_bytes("models/m.bin.sha256").startswith(b"a key")


# --- compare-and-swap -----------------------------------------------------------------------------------


def test_if_none_match(store: Store) -> None:
    token = store.put_bytes("champion.json", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailed, match="champion.json: already exists"):
        store.put_bytes("champion.json", b"v2", if_none_match=True)
    assert store.get_bytes("champion.json") == b"v1"
    assert store.etag("champion.json") == token


def test_if_match(store: Store) -> None:
    t1 = store.put_bytes("champion.json", b"v1")
    t2 = store.put_bytes("champion.json", b"v2", if_match=t1)
    assert store.etag("champion.json") == t2 != t1

    with pytest.raises(PreconditionFailed, match="champion.json"):
        store.put_bytes("champion.json", b"v3", if_match=t1)  # stale token
    assert store.get_bytes("champion.json") == b"v2"
    assert store.etag("champion.json") == t2

    with pytest.raises(PreconditionFailed, match="does not exist"):
        store.put_bytes("nobody.json", b"v1", if_match=t2)
    assert not store.exists("nobody.json")
    with pytest.raises(ValueError, match="pass if_match or if_none_match, not both"):
        store.put_bytes("champion.json", b"v4", if_match=t2, if_none_match=True)


def race_to_create(store: Store, key: str, writers: int) -> tuple[list[int], list[PreconditionFailed]]:
    """Release ``writers`` threads at once, each creating ``key``; return the winners and the losers' errors."""
    barrier = threading.Barrier(writers)
    winners: list[int] = []
    losers: list[PreconditionFailed] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            store.put_bytes(key, f"writer {i}".encode(), if_none_match=True)
            winners.append(i)
        except PreconditionFailed as exc:
            losers.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return winners, losers


def test_racing_creates_exactly_one_wins(store: Store) -> None:
    for round_ in range(3):
        key = f"race/{round_}.json"
        winners, losers = race_to_create(store, key, writers=8)
        assert len(winners) == 1, f"round {round_}: winners {winners}"
        assert len(losers) == 7
        assert store.get_bytes(key) == f"writer {winners[0]}".encode()


# --- integrity ------------------------------------------------------------------------------------------


def test_tampered_object_raises_integrity_error(store: Store, tmp_path: Path) -> None:
    store.put_bytes("models/x/model.safetensors", b"good weights")
    metadata = {}
    if isinstance(store, S3Store):
        client, bucket, prefix = raw_s3(store)
        metadata = client.head_object(Bucket=bucket, Key=prefix + "models/x/model.safetensors")["Metadata"]
    write_behind_back(store, "models/x/model.safetensors", b"evil weights", metadata)

    expected_uri = f"{store.uri}/models/x/model.safetensors"
    with pytest.raises(IntegrityError, match="checksum mismatch") as info:
        store.get_bytes("models/x/model.safetensors")
    assert str(info.value).startswith(f"{expected_uri}: checksum mismatch (expected ")

    out = tmp_path / "dl" / "model.safetensors"
    with pytest.raises(IntegrityError, match="checksum mismatch"):
        store.get_file("models/x/model.safetensors", out)
    assert not out.exists()
    assert os.listdir(out.parent) == []  # the temp download was removed


def test_foreign_object_reads_with_warning(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    write_behind_back(store, "incoming/report.csv", b"a,b\n1,2\n")
    with caplog.at_level(logging.WARNING, logger="protein.storage"):
        assert store.get_bytes("incoming/report.csv") == b"a,b\n1,2\n"
    assert "no sha256 recorded" in caplog.text
    assert "incoming/report.csv" in caplog.text
    assert store.list() == ["incoming/report.csv"]
    assert store.etag("incoming/report.csv") is not None


# --- keys, URLs, URIs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/./b", "a b", "é", "", "a/", "x/..", "a\\b", "a" * 513])
def test_validate_key_rejects(key: str) -> None:
    refused = r"^(invalid object key|object key must not be empty|object key longer than 512)"
    with pytest.raises(ValueError, match=refused):
        validate_key(key)


@pytest.mark.parametrize("key", ["a", "models/v-1/model.safetensors", "runs/date=2024-01-01/x_y.json", "a" * 512])
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


def test_every_method_validates_keys(store: Store, tmp_path: Path) -> None:
    bad = "../escape"
    calls = [
        lambda: store.put_bytes(bad, b"x"),
        lambda: store.get_bytes(bad),
        lambda: store.put_file(bad, tmp_path / "x"),
        lambda: store.get_file(bad, tmp_path / "x"),
        lambda: store.exists(bad),
        lambda: store.list(bad),
        lambda: store.delete(bad),
        lambda: store.delete_prefix(bad),
        lambda: store.etag(bad),
        lambda: store.url(bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"^invalid object key '\.\./escape'"):
            call()
    assert not (tmp_path / "escape").exists()


def test_url_serves_the_bytes(store: Store) -> None:
    store.put_bytes("reports/index.html", b"<h1>hi</h1>")
    url = store.url("reports/index.html", expires_s=60)
    if isinstance(store, S3Store):
        assert url.startswith("http://127.0.0.1:") and "Signature=" in url
    else:
        assert url.startswith("file:///")
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"<h1>hi</h1>"


def test_local_store_is_lazy(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "store"
    store = open_store(root.as_uri())  # file:// URI, same as a plain path
    assert isinstance(store, LocalStore) and store.uri == str(root)
    store.check()
    assert store.list() == [] and not store.exists("a") and store.etag("a") is None
    store.delete("a")
    with pytest.raises(NotFound, match=r"/a: not found$"):
        store.get_bytes("a")
    assert not (tmp_path / "deep").exists()

    store.put_bytes("a", b"1")
    assert open_store(str(root)).get_bytes("a") == b"1"


def test_local_check_rejects_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        open_store(str(tmp_path / "file" / "store")).check()


def test_open_store_uris() -> None:
    assert open_store("s3://bucket/some/prefix/").uri == "s3://bucket/some/prefix"
    assert open_store("s3://bucket").uri == "s3://bucket"
    assert isinstance(open_store("s3://bucket/p"), Store)
    refusals = {
        "gs://bucket/p": "gs://bucket/p: unsupported store URI",
        "s3://bucket/a b": "s3://bucket/a b: invalid prefix",
        "s3://x/p": "s3://x: invalid bucket name",
        "file://otherhost/p": "file://otherhost/p: file:// URIs must name a local path",
        "": "store URI must be a non-empty string",
    }
    for uri, message in refusals.items():
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            open_store(uri)


def leave_interrupted_upload(store: Store, key: str) -> None:
    """What a writer killed mid-way leaves: a local temp file, or an unfinished multipart upload."""
    if isinstance(store, LocalStore):
        store.put_bytes("warm-up", b"x")  # creates the store's folders
        leftover = store.root / ".protein+meta" / "tmp" / "put-deadbeef.tmp"
        leftover.write_bytes(b"half a checkpoint")
        old = time.time() - 7200
        os.utime(leftover, (old, old))
    else:
        client, bucket, prefix = raw_s3(store)
        client.create_multipart_upload(Bucket=bucket, Key=prefix + key)


def test_stale_interrupted_uploads_are_cleaned(store: Store) -> None:
    leave_interrupted_upload(store, "runs/r1/checkpoint.pt")
    # moto dates every multipart upload 2010, so any age removes it here; the age guard on S3 (a fresh
    # upload kept, an old one removed) is tested through the fault proxy, which reports real times.
    age = 3600
    assert store.clean_stale_uploads(older_than_s=age, dry_run=True) == 1
    assert store.clean_stale_uploads(older_than_s=age, dry_run=True) == 1  # a dry run removes nothing
    assert store.clean_stale_uploads(older_than_s=age) == 1
    assert store.clean_stale_uploads(older_than_s=age) == 0
    assert "runs/r1/checkpoint.pt" not in store.list()


def test_stale_uploads_are_judged_on_the_stores_clock(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto dates every multipart upload 2010: a store whose clock says 2000 holds no upload an hour
    old, whatever this host's clock says (a host running fast aborted live uploads)."""
    store = open_store(s3_bucket)
    leave_interrupted_upload(store, "cache/split.npy")
    monkeypatch.setattr(store, "clock", lambda: 946684800.0)  # 2000-01-01 on the store
    assert store.clean_stale_uploads(older_than_s=3600, dry_run=True) == 0
    monkeypatch.undo()
    assert store.clean_stale_uploads(older_than_s=3600, dry_run=True) == 1


@pytest.mark.parametrize(("date", "expected"), [
    ("Mon, 07 Dec 2026 10:00:00 GMT", 1796637601.0),
    ("Mon, 07 Dec 2026 10:00:00 -0000", 1796637601.0),  # no zone named: UTC, never this host's local time
    ("Mon Dec  7 10:00:00 2026", 1796637601.0),  # asctime form, which HTTP allows
    ("yesterday", None),
    (None, None),
])
def test_the_stores_clock_is_its_date_header_read_as_utc(date: str | None, expected: float | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_store("s3://clock-bucket/prefix")
    headers = {"date": date} if date else {}

    class Client:
        def list_objects_v2(self, **kwargs: Any) -> dict[str, Any]:
            assert kwargs == {"Bucket": "clock-bucket", "Prefix": "prefix/", "MaxKeys": 1}
            return {"ResponseMetadata": {"HTTPHeaders": headers}}

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        monkeypatch.setattr(store, "_client", Client)
        if expected is None:
            refused = r"^s3://clock-bucket/prefix: the server's (answer carries no Date|Date header)"
            with pytest.raises(StoreError, match=refused):
                store.clock()
        else:
            assert store.clock() == expected  # the end of the second the header names
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_young_temp_files_are_left_alone(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("warm-up", b"x")
    (store.root / ".protein+meta" / "tmp" / "put-inflight.tmp").write_bytes(b"being written right now")
    assert store.clean_stale_uploads(older_than_s=3600) == 0


def test_models_gc_aborts_only_uploads_older_than_a_day_unless_told(tmp_path: Path, protein_cli: Any) -> None:
    """Interrupted uploads are aborted store-wide (a decoded split pushed to the shared cache, big
    weights), so `--older-than-hours 0`, meant for incomplete versions, does not reach an upload two
    hours old: that takes `--uploads-older-than-hours` (default 24)."""
    store = open_store(str(tmp_path / "store"))
    store.put_bytes("warm-up", b"x")
    tmp = store.root / ".protein+meta" / "tmp"
    for name, hours in (("put-two-hours.tmp", 2), ("put-two-days.tmp", 48)):
        (tmp / name).write_bytes(b"part of an upload")
        old = time.time() - hours * 3600
        os.utime(tmp / name, (old, old))

    def gc(*options: str) -> dict[str, Any]:
        result = protein_cli("models", "gc", "--store", str(store.root), *options)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert gc("--older-than-hours", "0")["stale_uploads"] == 1
    assert sorted(p.name for p in tmp.iterdir()) == ["put-two-hours.tmp"]
    assert gc("--uploads-older-than-hours", "1")["stale_uploads"] == 1
    assert list(tmp.iterdir()) == []
    refused = protein_cli("models", "gc", "--store", str(store.root), "--uploads-older-than-hours", "-1")
    assert refused.returncode == 2 and "--uploads-older-than-hours must be a finite number >= 0" in refused.stderr


# --- create-only files, big byte payloads, listings with times -------------------------------------------


def test_put_file_create_only(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "w.bin"
    source.write_bytes(b"first")
    digest = store.put_file("models/v/model.safetensors", source, if_none_match=True)
    assert digest == hashlib.sha256(b"first").hexdigest()
    source.write_bytes(b"second")
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.put_file("models/v/model.safetensors", source, if_none_match=True)
    assert store.get_bytes("models/v/model.safetensors") == b"first"
    assert store.recorded_sha256("models/v/model.safetensors") == (5, digest)
    assert store.recorded_sha256("models/v/none") is None


def test_big_payloads_go_up_as_multipart(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage.s3, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(storage.s3, "MULTIPART_CHUNKSIZE", 5 * MiB)
    payload = os.urandom(10 * MiB + 1)
    etag = store.put_bytes("runs/r/checkpoint.pt", payload)
    if isinstance(store, S3Store):
        assert etag.strip('"').endswith("-3"), f"not a 3-part upload: {etag}"
    assert store.get_bytes("runs/r/checkpoint.pt") == payload
    with pytest.raises(PreconditionFailed, match="runs/r/checkpoint.pt: "):
        store.put_bytes("runs/r/checkpoint.pt", payload, if_match='"0123456789abcdef0123456789abcdef"')
    if isinstance(store, S3Store):
        assert store.clean_stale_uploads(older_than_s=0) == 0  # the refused upload was aborted, not left


def test_list_info_gives_sizes_and_times(store: Store) -> None:
    before = time.time() - 5  # moto and the local clock agree within seconds; S3 times are whole seconds
    store.put_bytes("a/one", b"1")
    store.put_bytes("a/two", b"22")
    infos = store.list_info("a/")
    assert [(i.key, i.size) for i in infos] == [("a/one", 1), ("a/two", 2)]
    assert all(before <= i.modified <= time.time() + 5 for i in infos)


def test_s3_check_passes_on_an_endpoint_with_conditional_writes(s3_bucket: str) -> None:
    store = open_store(s3_bucket)
    store.check()
    assert store.list() == []  # the probe was removed
