"""The cache folder's size bound (protein.cache_budget) and the decoded-image cache's integrity."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from protein.cache import CacheKey, ImageCache
from protein.cache_budget import (
    RECENT_USE_S,
    STALE_TEMP_S,
    CacheEntry,
    EntryHold,
    cache_entries,
    choose_evictions,
    download_lock,
    enforce_cache_budget,
    max_cache_bytes,
)
from protein.data import data_cache_dir, fingerprint, load_competition, s3
from protein.data.digests import cache_file_for
from protein.data.manifest import MANIFEST, manifest_key
from protein.data.push import push_dataset
from protein.data.s3 import _file_lock
from protein.data.sources import ZipSource
from protein.errors import DataError
from protein.storage import ListedObject, LocalStore
from protein.validation.history import mirror_root
from tests.helpers import write_dataset, zip_folder

DAY = 86400.0


def entry(name: str, size: int, last_used: float) -> CacheEntry:
    return CacheEntry(name, (), size, last_used)


def test_least_recently_used_entries_go_first_until_the_rest_fits() -> None:
    now = 100 * DAY
    entries = [entry("new", 40, now - 2 * DAY), entry("oldest", 30, now - 9 * DAY), entry("old", 30, now - 5 * DAY)]
    assert [e.name for e in choose_evictions(entries, 70, now)] == ["oldest"]
    assert [e.name for e in choose_evictions(entries, 40, now)] == ["oldest", "old"]
    assert choose_evictions(entries, 100, now) == []


def test_kept_and_recently_used_entries_are_never_chosen() -> None:
    now = 100 * DAY
    entries = [entry("kept", 50, now - 9 * DAY), entry("in-use", 50, now - 60), entry("old", 50, now - 5 * DAY)]
    chosen = choose_evictions(entries, 0, now, keep=frozenset({"kept"}))
    assert [e.name for e in chosen] == ["old"]


def age(path: Path, days: float) -> None:
    stamp = time.time() - days * DAY
    os.utime(path, (stamp, stamp))


def make_cache(root: Path) -> None:
    """Two decoded splits, two model versions and two dataset files, each 1 KiB-ish, of known ages."""
    root.mkdir(parents=True, exist_ok=True)
    for name, days in (("split-a", 1), ("split-b", 8)):
        (root / f"{name}.npy").write_bytes(b"x" * 1000)
        (root / f"{name}.json").write_text("{}")
        (root / f"{name}.lock").touch()
        age(root / f"{name}.json", days)
        age(root / f"{name}.npy", days)
    for version, days in (("m1", 6), ("m2", 2)):
        folder = root / "models" / version
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
        age(folder, days)
    for name, days in (("ab/sha256-ab", 7), ("cd/sha256-cd", 0)):
        path = root / "datasets" / "objects" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"p" * 1000)
        age(path, days)
    (root / "datasets" / "objects" / "cd" / ".sha256-ef.1234.tmp").write_bytes(b"t" * 5000)  # in flight


def test_the_budget_removes_whole_entries_oldest_first(tmp_path: Path) -> None:
    make_cache(tmp_path)
    names = {e.name for e in cache_entries(tmp_path)}
    assert names == {"images/split-a", "images/split-b", "models/m1", "models/m2",
                     "datasets/objects/ab/sha256-ab", "datasets/objects/cd/sha256-cd"}
    removed = enforce_cache_budget(tmp_path, max_bytes=3100)
    assert removed == ["images/split-b", "datasets/objects/ab/sha256-ab", "models/m1"]
    assert not (tmp_path / "split-b.npy").exists() and not (tmp_path / "split-b.json").exists()
    assert (tmp_path / "split-b.lock").exists(), "lock files stay, so two processes lock the same file"
    assert not (tmp_path / "models" / "m1").exists() and (tmp_path / "models" / "m2").is_dir()
    assert (tmp_path / "datasets" / "objects" / "cd" / ".sha256-ef.1234.tmp").exists()
    assert sum(e.size for e in cache_entries(tmp_path)) <= 3100


def test_an_entry_used_after_the_listing_is_not_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the bound's listing and its delete, another process starts using an old entry (loads
    a model folder, reads a decoded split): it touched it, so the bound leaves it."""
    import protein.cache_budget as budget

    make_cache(tmp_path)
    listed = budget.cache_entries

    def listing_then_a_reader_arrives(root: Path) -> list[CacheEntry]:
        entries = listed(root)
        budget.touch(tmp_path / "models" / "m1")
        budget.touch(tmp_path / "split-b.json")
        return entries

    monkeypatch.setattr(budget, "cache_entries", listing_then_a_reader_arrives)
    removed = enforce_cache_budget(tmp_path, max_bytes=3100)
    assert "models/m1" not in removed and "images/split-b" not in removed
    assert (tmp_path / "models" / "m1").is_dir() and (tmp_path / "split-b.npy").exists()


def test_what_was_used_within_the_hour_stays_even_over_the_bound(tmp_path: Path) -> None:
    make_cache(tmp_path)
    enforce_cache_budget(tmp_path, max_bytes=0)
    assert {e.name for e in cache_entries(tmp_path)} == {"datasets/objects/cd/sha256-cd"}


def test_the_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", "1.5")
    assert max_cache_bytes() == int(1.5 * 2**30)
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", "lots")
    with pytest.raises(ValueError, match="PROTEIN_CACHE_MAX_GB='lots': expected a positive number of GiB"):
        max_cache_bytes()
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", "0")
    with pytest.raises(ValueError, match="expected a positive number"):
        max_cache_bytes()


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "nan"])
def test_a_bound_that_is_no_finite_number_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", value)
    with pytest.raises(ValueError, match=f"PROTEIN_CACHE_MAX_GB='{value}': expected a positive number of GiB"):
        max_cache_bytes()


def test_a_bad_bound_fails_a_build_before_it_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import protein.cache

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded before the bound was checked")

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    monkeypatch.setattr(protein.cache, "decode_all", no_decode)
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", "inf")
    with pytest.raises(ValueError, match="PROTEIN_CACHE_MAX_GB='inf'"):
        ImageCache(tmp_path / "cache").build(load_competition(root), "train", 16)


def test_building_a_split_keeps_the_cache_within_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["t"], size=16)
    cache_root = tmp_path / "cache"
    make_cache(cache_root)
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", str(2500 / 2**30))
    ImageCache(cache_root).build(load_competition(root), "train", 16)
    left = {e.name for e in cache_entries(cache_root)}
    # Every kind of entry made room, models and dataset objects too, not only decoded splits: the split
    # just built stays, and the dataset object beside an upload in flight.
    [built] = [name for name in left if name.startswith("images/")]
    assert left == {built, "datasets/objects/cd/sha256-cd"}, left


def test_a_same_length_corruption_is_rebuilt_not_served(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")
    good = np.array(cache.build(data, "train", 16))
    key = CacheKey(fingerprint(data.source), "train", 16)
    array_path, _ = cache.paths(key)
    raw = bytearray(array_path.read_bytes())
    raw[-1] ^= 0xFF  # the last pixel's blue value: same length, same header
    array_path.write_bytes(bytes(raw))
    assert cache.load(key, data.train_ids) is None
    np.testing.assert_array_equal(np.array(cache.build(data, "train", 16)), good)


def test_gc_leaves_lock_files(tmp_path: Path) -> None:
    make_cache(tmp_path)
    removed = ImageCache(tmp_path).gc(older_than_days=3)
    assert removed == ["split-b"]
    assert (tmp_path / "split-b.lock").exists() and not (tmp_path / "split-b.npy").exists()


def test_gc_never_removes_an_array_whose_build_holds_its_lock(tmp_path: Path) -> None:
    """A build moves its array into place, hashes it, then writes its ids: meanwhile the array has no
    ids file, as a dead build's has, but its builder holds the lock and is about to read it again."""
    array = write_aged(tmp_path / "k.npy", 5000, 60)
    cache = ImageCache(tmp_path)
    with cache.lock_by_name("k"):
        assert cache.gc(older_than_days=0) == [] and array.exists()
    assert cache.gc(older_than_days=0) == ["k"] and not array.exists()


def test_gc_keeps_an_entry_used_while_it_waited_for_its_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gc finds split-b unused for 8 days, then waits on its lock: the holder was rebuilding or loading
    it, so when gc gets the lock the entry is fresh and stays."""
    make_cache(tmp_path)
    cache = ImageCache(tmp_path)
    lock = cache.lock_by_name

    def after_a_holder_renewed_it(name: str) -> contextlib.AbstractContextManager[None]:
        os.utime(tmp_path / f"{name}.json")
        return lock(name)

    monkeypatch.setattr(cache, "lock_by_name", after_a_holder_renewed_it)
    assert cache.gc(older_than_days=3) == []
    assert (tmp_path / "split-b.npy").exists() and (tmp_path / "split-b.json").exists()


def write_aged(path: Path, size: int, seconds: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"t" * size)
    stamp = time.time() - seconds
    os.utime(path, (stamp, stamp))
    return path


def test_temp_files_of_killed_writers_go_once_stale_never_a_live_ones(tmp_path: Path) -> None:
    key = "f00d-train-16px-p1-pil11.0.0"
    stale = 2 * STALE_TEMP_S
    killed = [write_aged(tmp_path / f".{key}.npy.ab_1xyz9.tmp", 5000, stale),  # a decode (atomic_path)
              write_aged(tmp_path / "datasets" / "objects" / "ab" / ".sha256-ab.0123456789ab.tmp", 500, stale),
              write_aged(tmp_path / "datasets" / "zips" / "0123.zip.part", 500, stale)]
    in_flight = write_aged(tmp_path / "datasets" / "objects" / "cd" / ".sha256-cd.ba9876543210.tmp", 500, 60)
    stalled = write_aged(tmp_path / ".beef-train-16px-p1-pil11.0.0.npy.cd_2xyz8.tmp", 5000, stale)
    with ImageCache(tmp_path).lock_by_name("beef-train-16px-p1-pil11.0.0"):  # its builder is alive, if slow
        removed = enforce_cache_budget(tmp_path, max_bytes=10**9)  # within the bound: temps go anyway
    assert sorted(removed) == sorted(p.relative_to(tmp_path).as_posix() for p in killed)
    assert not any(p.exists() for p in killed)
    assert in_flight.exists() and stalled.exists()


def test_cache_gc_removes_temp_files_as_old_as_it_is_told_but_never_a_fresh_one(tmp_path: Path) -> None:
    week_old = write_aged(tmp_path / ".f00d-test-16px-p1-pil11.0.0.json.ab_1xyz9.tmp", 50, 7 * DAY)
    day_old = write_aged(tmp_path / "datasets" / "objects" / "ab" / ".sha256-ab.0123456789ab.tmp", 50, DAY)
    fresh = write_aged(tmp_path / "datasets" / "zips" / "0123.zip.part", 50, 60)
    cache = ImageCache(tmp_path)
    assert cache.gc(older_than_days=3, dry_run=True) == [week_old.name] and week_old.exists()
    assert cache.gc(older_than_days=3) == [week_old.name] and not week_old.exists()
    assert cache.gc(older_than_days=0) == ["datasets/objects/ab/.sha256-ab.0123456789ab.tmp"]
    assert not day_old.exists() and fresh.exists()


def test_a_killed_model_downloads_temp_file_goes_though_its_folder_is_used_every_night(tmp_path: Path) -> None:
    """Registry.download writes the weights through a temp file beside them; a kill leaves it in the
    champion's folder, which is used every night, so no eviction of the folder would ever take it."""
    killed = write_aged(tmp_path / "models" / "v1" / ".model.safetensors.0123456789abcdef.tmp", 5000, 3 * DAY)
    (tmp_path / "models" / "v1" / "model.safetensors").write_bytes(b"w" * 1000)
    in_flight = write_aged(tmp_path / "models" / "v2" / ".model.safetensors.fedcba9876543210.tmp", 500, 60)
    assert enforce_cache_budget(tmp_path, max_bytes=10**9) == ["models/v1/.model.safetensors.0123456789abcdef.tmp"]
    assert not killed.exists() and in_flight.exists() and (tmp_path / "models" / "v1" / "model.safetensors").exists()
    killed = write_aged(killed, 5000, 3 * DAY)
    assert ImageCache(tmp_path).gc(older_than_days=2) == ["models/v1/.model.safetensors.0123456789abcdef.tmp"]
    assert not killed.exists() and in_flight.exists()


def test_lock_files_and_partial_downloads_are_not_entries(tmp_path: Path) -> None:
    zips = tmp_path / "datasets" / "zips"
    legacy_lock = write_aged(zips / "abc.lock", 0, 2 * DAY)  # where zip locks lived before datasets/locks/
    part = write_aged(zips / "def.zip.part", 5000, 600)  # older than the read timeout, younger than STALE_TEMP_S
    write_aged(zips / "other.zip", 1000, 2 * DAY)
    with _file_lock(legacy_lock):  # a process of the old code downloading abc.zip under it
        assert enforce_cache_budget(tmp_path, max_bytes=0) == ["datasets/zips/other.zip"]
        assert legacy_lock.exists() and part.exists()
    assert cache_entries(tmp_path) == []


def test_an_old_partial_download_stays_while_its_download_runs(tmp_path: Path) -> None:
    part = write_aged(tmp_path / "datasets" / "zips" / "def.zip.part", 5000, 2 * STALE_TEMP_S)  # a slow resume
    with _file_lock(download_lock(part.with_suffix(""))):
        assert enforce_cache_budget(tmp_path, max_bytes=0) == [] and part.exists()
    assert enforce_cache_budget(tmp_path, max_bytes=0) == ["datasets/zips/def.zip.part"]


def test_a_zip_read_in_place_is_never_evicted_however_old_its_last_use(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    cache = tmp_path / "cache"
    (cache / "datasets" / "zips").mkdir(parents=True)
    zip_path = zip_folder(data, cache / "datasets" / "zips" / "0123.zip")
    source = ZipSource(zip_path, cache_dir=cache, hold=EntryHold(zip_path))
    age(zip_path, 2)  # a run opened it yesterday and decodes still
    assert enforce_cache_budget(cache, max_bytes=0) == [] and zip_path.exists()
    worker = pickle.loads(pickle.dumps(source))  # a decode worker reopens the zip by path
    assert worker.read_bytes("train/1.png") == (data / "train" / "1.png").read_bytes()
    del source, worker
    gc.collect()
    assert enforce_cache_budget(cache, max_bytes=0) == ["datasets/zips/0123.zip"]


MONTH = 30 * DAY


def history_mirror(root: Path) -> Path:
    """The Data Docs mirror in the cache at `root` of a store that is only named: its URI picks the folder."""
    return mirror_root(LocalStore(root.parent / "store"), root)


def make_month_old_history(root: Path) -> list[Path]:
    """What the bound once missed, a month old, each at the path its writer uses: a pushed dataset's
    fetched manifest (protein.data.s3), hash caches (protein.data.digests) and the Data Docs mirror's
    results and per-run pages (protein.validation.history), with the folders they sit in."""
    datasets = data_cache_dir(root)
    mirror = history_mirror(root)
    paths = [write_aged(datasets / "manifests" / "0123abcd.json", 1000, MONTH),
             write_aged(cache_file_for(datasets, "folder", [root / "ds"]), 1000, MONTH),
             write_aged(cache_file_for(datasets, "folder-sha256", [root / "ds"]), 1000, MONTH),
             write_aged(cache_file_for(datasets, "zip", [root / "ds.zip", 1, 2]), 1000, MONTH),
             write_aged(mirror / "results" / "suite" / "run-a" / "20250101T000000Z" / "batch.json", 1000, MONTH),
             write_aged(mirror / "docs" / "validations" / "suite" / "run-a" / "20250101T000000Z" / "batch.html", 1000,
                        MONTH)]
    for path in paths:
        for folder in path.parents:
            if folder == root:
                break
            age(folder, MONTH / DAY)
    return paths


def names_of(root: Path, paths: list[Path]) -> set[str]:
    """The entry names the bound gives these files (a dataset file's under datasets/, the others' under root)."""
    return {(f"datasets/{p.relative_to(data_cache_dir(root)).as_posix()}" if p.is_relative_to(data_cache_dir(root))
             else p.relative_to(root).as_posix()) for p in paths}


def test_manifests_hash_caches_and_the_validation_mirror_count_and_go_least_recently_used_first(
        tmp_path: Path) -> None:
    make_cache(tmp_path)
    month_old = make_month_old_history(tmp_path)
    datasets = data_cache_dir(tmp_path)
    mirror = history_mirror(tmp_path)
    opened = write_aged(datasets / "manifests" / "4567cdef.json", 1000, 600)  # a hit ten minutes ago touched it
    just_fetched = write_aged(datasets / "manifests" / "89abcdef.json", 1000, MONTH)  # fetch_object names it: keep
    rehashed = write_aged(cache_file_for(datasets, "folder", [tmp_path / "other"]), 1000, 600)
    written = write_aged(mirror / "results" / "suite" / "run-b" / "20250301T000000Z" / "batch.json", 1000, 600)
    held = write_aged(datasets / "zips" / "0123.zip", 1000, MONTH)
    hold = EntryHold(held)  # a run reads this zip in place
    assert names_of(tmp_path, [*month_old, opened, just_fetched, rehashed, written, held]) <= {
        e.name for e in cache_entries(tmp_path)}

    removed = enforce_cache_budget(tmp_path, max_bytes=1, keep=[f"datasets/manifests/{just_fetched.name}"])
    assert names_of(tmp_path, month_old) <= set(removed)
    assert not any(p.exists() for p in month_old), "a month-old manifest, hash cache or mirror file goes"
    assert opened.exists() and rehashed.exists() and written.exists(), "what was used within the hour stays"
    assert just_fetched.exists(), "the manifest its fetch just wrote (and is about to read) stays"
    assert held.exists(), "a zip held open stays"
    assert {e.name for e in cache_entries(tmp_path)} == {
        "datasets/objects/cd/sha256-cd", *names_of(tmp_path, [opened, just_fetched, rehashed, written, held])}
    hold.release()


def test_every_file_the_cache_holds_counts_toward_its_bound_or_is_a_lock_or_a_temp(tmp_path: Path) -> None:
    make_cache(tmp_path)
    make_month_old_history(tmp_path)
    write_aged(data_cache_dir(tmp_path) / "zips" / "0123.zip", 1000, DAY)
    EntryHold(data_cache_dir(tmp_path) / "zips" / "0123.zip").release()  # leaves its lock in datasets/locks/
    write_aged(tmp_path / "died-before-its-meta.npy", 700, 30 * DAY)  # a build killed while hashing
    counted = {f for e in cache_entries(tmp_path) for p in e.paths
               for f in ([q for q in p.rglob("*") if q.is_file()] if p.is_dir() else [p])}
    assert sum(e.size for e in cache_entries(tmp_path)) == sum(f.stat().st_size for f in counted)
    uncounted = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                 if p.is_file() and p not in counted and p.suffix != ".lock" and not p.name.endswith(".tmp")}
    assert uncounted == set(), "files no bound would ever count or remove"


def test_a_split_whose_meta_was_never_written_is_evicted_but_never_while_its_build_holds_the_lock(
        tmp_path: Path) -> None:
    # _build_locked moves the array into place, hashes it, then writes the meta; a kill in between
    # (or a pull whose meta download failed) left an array no bound counted: 22 GB at 512 px, for good.
    name = "f00d-train-512px-p1-pil11.0.0"
    orphan = write_aged(tmp_path / f"{name}.npy", 5000, 2 * RECENT_USE_S)
    assert [(e.name, e.size) for e in cache_entries(tmp_path)] == [(f"images/{name}", 5000)]
    with ImageCache(tmp_path).lock_by_name(name):  # a build of the same key, hashing right now
        assert enforce_cache_budget(tmp_path, max_bytes=0) == [] and orphan.exists()
    fresh = write_aged(tmp_path / "beef-train-16px-p1-pil11.0.0.npy", 5000, 60)  # a build minutes old
    assert enforce_cache_budget(tmp_path, max_bytes=0) == [f"images/{name}"]
    assert not orphan.exists() and fresh.exists()


def test_the_mirror_loses_old_files_first_then_the_folders_they_left_empty(tmp_path: Path) -> None:
    mirror = history_mirror(tmp_path / "cache")
    old_run = mirror / "results" / "suite" / "run-a" / "20250101T000000Z"
    new_run = mirror / "results" / "suite" / "run-b" / "20250301T000000Z"
    write_aged(old_run / "batch.json", 1000, MONTH)
    written = write_aged(new_run / "batch.json", 1000, 600)
    killed = write_aged(old_run.parent / ".batch.json.k1ll3d.tmp", 500, 2 * STALE_TEMP_S)  # a sync_down that died
    assert enforce_cache_budget(tmp_path / "cache", max_bytes=0) == [
        f"validation-history/{mirror.name}/results/suite/run-a/20250101T000000Z/batch.json",
        killed.relative_to(tmp_path / "cache").as_posix()]
    assert old_run.is_dir(), "a folder emptied just now may be the one a validation is writing into: it waits"
    age(old_run, 2 * RECENT_USE_S / DAY)
    enforce_cache_budget(tmp_path / "cache", max_bytes=0)
    assert not old_run.exists() and old_run.parent.is_dir(), "empty for an hour: gone, its parent changed just now"
    assert written.exists() and mirror.is_dir()


def test_a_manifest_the_bound_removed_between_its_hit_and_its_read_is_fetched_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    pushed = push_dataset(str(write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)), store)
    key = manifest_key(pushed.fingerprint)
    raw = store.get_bytes(key)
    fetches: list[Path] = []

    def evicted_after_the_first_hit(_store: object, _info: ListedObject, folder: Path, suffix: str = "") -> Path:
        path = folder / f"0123abcd{suffix}"
        if fetches:  # the second fetch misses and downloads it again
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(raw)
        fetches.append(path)
        return path

    monkeypatch.setattr(s3, "_s3_store", lambda bucket, uri: object())
    monkeypatch.setattr(s3, "fetch_object", evicted_after_the_first_hit)
    prefix = key.removesuffix(MANIFEST)
    listed = [ListedObject(key, len(raw), '"etag"')]
    source = s3.S3Source(f"s3://bucket/{prefix}", "bucket", prefix, listed, data_cache_dir(tmp_path / "cache"))
    assert len(fetches) == 2 and source.manifest is not None and source.exists("train.csv")

    monkeypatch.setattr(s3, "fetch_object", lambda *args, **kwargs: tmp_path / "never-there.json")
    with pytest.raises(DataError, match="manifest.json: the downloaded copy vanished from .* twice"):
        s3.S3Source(f"s3://bucket/{prefix}", "bucket", prefix, listed, data_cache_dir(tmp_path / "cache"))


def test_a_hash_cache_read_without_a_miss_counts_as_a_use(tmp_path: Path) -> None:
    """The bound evicts the least recently used first, by mtime: a hash cache read every night but
    never rewritten (no file changed) would go as if unused, and cost a full re-hash."""
    from protein.data.digests import HashCache

    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 100)
    cache = HashCache(tmp_path / "cache" / "datasets" / "hashes" / "folder-1.json")
    first = cache.hexdigests({"data.bin": data})
    month_ago = time.time() - 30 * 86400
    os.utime(cache.path, (month_ago, month_ago))
    assert cache.hexdigests({"data.bin": data}) == first  # all hits
    assert cache.path.stat().st_mtime > time.time() - 60


def test_a_zip_hash_cache_read_without_a_miss_counts_as_a_use(tmp_path: Path) -> None:
    """As for a folder's hash cache: a zip fingerprinted every night from its cache must not go as if
    unused, or the next fingerprint decompresses and hashes every member again."""
    data = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    cache = tmp_path / "cache"
    source = ZipSource(zip_folder(data, tmp_path / "data.zip"), cache_dir=cache)
    first = source.digests()
    [hash_cache] = (cache / "datasets" / "hashes").rglob("*.json")
    month_ago = time.time() - MONTH
    os.utime(hash_cache, (month_ago, month_ago))
    assert source.digests() == first  # a hit
    assert hash_cache.stat().st_mtime > time.time() - 60
