"""The download cache's size bound against a real moto_server: a cached zip is marked used on every
open and kept while a run reads it, a dataset being hashed keeps the copies it reads, and zip locks
live where the bound never looks."""

import gc
import hashlib
import os
import pickle
import time

import boto3
import pytest

from protein.cache_budget import enforce_cache_budget
from protein.data import data_cache_dir, fingerprint, open_dataset
from protein.data.push import push_dataset
from protein.storage import LocalStore
from tests.helpers import write_dataset, write_png, zip_folder

pytestmark = pytest.mark.integration

DAY = 86400.0


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))
    return data_cache_dir()


@pytest.fixture
def bucket(s3_bucket):
    return s3_bucket.removeprefix("s3://").split("/")[0]


def age(path, seconds):
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))


def test_a_cached_zip_is_used_on_every_open_and_kept_while_a_run_reads_it(tmp_path, bucket, cache):
    data = write_dataset(tmp_path / "ds", {"1": "0", "2": "1 2", "3": "3"}, ["4", "5"], size=64)
    boto3.client("s3").upload_file(str(zip_folder(data, tmp_path / "ds.zip")), bucket, "data/ds.zip")
    uri = f"s3://{bucket}/data/ds.zip"
    night_one = open_dataset(uri)
    zip_path, digests = night_one.path, night_one.digests()
    del night_one  # yesterday's run ended
    gc.collect()
    age(zip_path, DAY)
    assert not list((cache / "zips").glob("*.lock")), "zip locks live in locks/, where the bound never looks"
    # A decoded split last used 3 h ago, larger than the zip: the least recently used entry, now.
    root = cache.parent
    (root / "old-train-64px.npy").write_bytes(b"x" * 50_000)
    (root / "old-train-64px.json").write_text("{}")
    for name in ("old-train-64px.npy", "old-train-64px.json"):
        age(root / name, 3 * 3600)

    source = open_dataset(uri)  # tonight's run: a cache hit
    assert source.path == zip_path and time.time() - zip_path.stat().st_mtime < 600, "a hit is a use"
    assert source.digests() == digests
    assert len(list((cache / "hashes").glob("zip-*.json"))) == 1, "marking the zip used costs no re-hash"
    assert enforce_cache_budget(root, max_bytes=zip_path.stat().st_size + 100) == ["images/old-train-64px"]

    age(zip_path, 2 * DAY)  # however long ago the run opened it, it still reads it
    assert enforce_cache_budget(root, max_bytes=0) == [] and zip_path.exists()
    worker = pickle.loads(pickle.dumps(source))  # a decode worker (no handle: it reopens the zip by path)
    assert worker.read_bytes("train/1.png") == (data / "train" / "1.png").read_bytes()
    del source, worker
    gc.collect()
    assert enforce_cache_budget(root, max_bytes=0) == [f"datasets/zips/{zip_path.name}"]


def test_hashing_a_grown_prefix_under_a_tight_bound_keeps_the_copies_it_reads(tmp_path, bucket, cache, monkeypatch):
    data = write_dataset(tmp_path / "ds", {str(i): "0" for i in range(1, 9)}, ["90", "91"], size=64)
    client = boto3.client("s3")
    for path in sorted(data.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"raw/{path.relative_to(data).as_posix()}")
    uri = f"s3://{bucket}/raw/"
    yesterday = open_dataset(uri)  # a validate or train run read the whole prefix through the cache
    for folder in ("train", "test"):
        yesterday.fetch([f"{folder}/{name}" for name in yesterday.list_dir(folder)])
    for path in (cache / "objects").rglob("*"):
        if path.is_file():
            age(path, DAY)
    # Today one image was added, and the host's cache is at its bound.
    write_png(data / "train" / "100.png", 64, seed=100)
    (data / "train.csv").write_text((data / "train.csv").read_text() + "100,1\n")
    client.upload_file(str(data / "train" / "100.png"), bucket, "raw/train/100.png")
    client.upload_file(str(data / "train.csv"), bucket, "raw/train.csv")
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", str(40_000 / 2**30))

    source = open_dataset(uri)
    names = source.fingerprint_files()
    assert source.sha256s(names) == {n: hashlib.sha256((data / n).read_bytes()).hexdigest() for n in names}
    result = push_dataset(uri, LocalStore(tmp_path / "store"))
    assert result.fingerprint == fingerprint(open_dataset(data))

    # A fetch with nothing to download still marks its files used: another process's bound, between
    # the fetch and the caller's read, leaves them alone.
    for path in (cache / "objects").rglob("*"):
        if path.is_file():
            age(path, DAY)
    assert source.fetch(names) == 0
    assert enforce_cache_budget(cache.parent, max_bytes=0) == []
