import json
import os
import time

import numpy as np
import pytest

from protein.cache import CacheKey, ImageCache
from protein.data import fingerprint, load_competition, load_image
from tests.helpers import write_dataset, write_png


def test_cached_pixels_equal_a_fresh_decode(tmp_path):
    root = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(70)}, ["100"], size=48)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")
    images = cache.build(data, "train", 32, workers=2)  # 70 images: two chunks, two processes
    assert images.shape == (70, 32, 32, 3)
    for i in (0, 33, 69):
        fresh = load_image((root / "train" / f"{i}.png").read_bytes(), "x", 32)
        np.testing.assert_array_equal(images[i], fresh)
    single = ImageCache(tmp_path / "cache1").build(data, "train", 32, workers=1)
    np.testing.assert_array_equal(np.asarray(images), np.asarray(single))


def test_changed_image_invalidates_the_cache(tmp_path):
    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    cache = ImageCache(tmp_path / "cache")
    data = load_competition(root)
    first = np.array(cache.build(data, "train", 16))
    key = CacheKey(fingerprint(data.source), "train", 16)
    assert cache.load(key, data.train_ids) is not None

    write_png(root / "train" / "2.png", size=16, seed=1234)
    data = load_competition(root)
    assert CacheKey(fingerprint(data.source), "train", 16) != key
    second = np.array(cache.build(data, "train", 16))
    np.testing.assert_array_equal(second[0], first[0])
    assert not np.array_equal(second[1], first[1])
    np.testing.assert_array_equal(second[1], load_image((root / "train" / "2.png").read_bytes(), "x", 16))


def test_cache_with_other_ids_is_not_reused(tmp_path):
    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")
    key = CacheKey("same", "train", 16)
    cache.build(data, "train", 16, key=key)
    assert cache.load(key, ["2", "1"]) is None


def test_cache_is_shared_through_the_store(tmp_path, monkeypatch):
    from protein.storage import open_store

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4", "3": "6"}, ["9"], size=16)
    data = load_competition(root)
    store = open_store(str(tmp_path / "store"))
    built = np.array(ImageCache(tmp_path / "worker-a").build(data, "train", 16, shared=store))
    key = CacheKey(fingerprint(data.source), "train", 16)
    assert store.exists(f"cache/{key.name}.npy") and store.exists(f"cache/{key.name}.json")

    # Another worker pulls instead of decoding: make decoding impossible to prove it.
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the store had the cache")

    monkeypatch.setattr("protein.cache.decode_all", no_decode)
    pulled = ImageCache(tmp_path / "worker-b").build(data, "train", 16, shared=store)
    np.testing.assert_array_equal(np.asarray(pulled), built)


def test_key_names_the_preprocessing_and_pillow_versions():
    import PIL

    from protein.cache import PREPROCESS_VERSION

    key = CacheKey("abc", "train", 32)
    assert key.name == f"abc-train-32px-p{PREPROCESS_VERSION}-pil{PIL.__version__}"
    assert CacheKey("abc", "train", 32, pillow="0.0") != key
    assert CacheKey("abc", "train", 32, preprocess=PREPROCESS_VERSION + 1).name != key.name


HANDSHAKE_S = 120  # generous on a loaded machine; each wait ends as soon as the other side signals


def _wait_for(path, what: str) -> None:
    import time

    deadline = time.monotonic() + HANDSHAKE_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {path} did not appear within {HANDSHAKE_S}s")
        time.sleep(0.02)


def _build_in_turn(role, root, cache_dir, signals, out):
    """Runs in a separate process. 'first' decodes and, while it holds the entry's lock, waits until
    'second' has asked for that lock; 'second' starts building only once 'first' holds it. Each
    decode pass appends one line to `out`."""
    import protein.cache as cache_module
    from protein.data import load_competition as load

    real_decode, real_lock = cache_module.decode_all, cache_module.ImageCache.lock_by_name

    def counting(*args, **kwargs):
        with open(out, "a") as f:
            f.write(f"decode by {role}\n")
        if role == "first":
            (signals / "first-holds-the-lock").touch()
            _wait_for(signals / "second-asks-for-the-lock", "the second process never asked for the lock")
        return real_decode(*args, **kwargs)

    def announcing_lock(self, name):
        if role == "second":
            (signals / "second-asks-for-the-lock").touch()
        return real_lock(self, name)

    cache_module.decode_all = counting
    cache_module.ImageCache.lock_by_name = announcing_lock
    if role == "second":
        _wait_for(signals / "first-holds-the-lock", "the first process never started decoding")
    cache_module.ImageCache(cache_dir).build(load(root), "train", 16, workers=1)


def test_two_processes_building_one_entry_decode_once(tmp_path):
    """The second process asks for the entry while the first is decoding it under the lock (a
    file handshake shows they overlapped); it waits, then finds the finished entry."""
    import multiprocessing

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    out, signals = tmp_path / "decodes.txt", tmp_path / "signals"
    signals.mkdir()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_build_in_turn, args=(role, root, tmp_path / "cache", signals, out))
             for role in ("first", "second")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    assert (signals / "second-asks-for-the-lock").exists()
    assert out.read_text().splitlines() == ["decode by first"]


def test_truncated_or_corrupt_entries_are_rebuilt_not_raised(tmp_path):
    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")
    good = np.array(cache.build(data, "train", 16))
    key = CacheKey(fingerprint(data.source), "train", 16)
    array_path, meta_path = cache.paths(key)
    for damage in (lambda: array_path.write_bytes(array_path.read_bytes()[:100]),  # truncated .npy
                   lambda: array_path.write_bytes(b"not numpy at all"),
                   lambda: meta_path.write_text("{not json")):
        damage()
        assert cache.load(key, data.train_ids) is None
        np.testing.assert_array_equal(np.asarray(cache.build(data, "train", 16)), good)
        assert cache.load(key, data.train_ids) is not None


def test_cache_gc_removes_old_local_and_shared_entries(tmp_path, capsys):
    import datetime as dt
    import json
    import os

    from protein.cli import main
    from protein.storage import open_store

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    store = open_store(str(tmp_path / "store"))
    cache = ImageCache(tmp_path / "cache")
    old, new = CacheKey("old", "train", 16), CacheKey("new", "train", 16)
    for key in (old, new):
        cache.build(data, "train", 16, key=key, shared=store)
    ten_days_ago = dt.datetime.now().timestamp() - 10 * 86400
    for path in cache.paths(old):
        os.utime(path, (ten_days_ago, ten_days_ago))
    for suffix in ("npy", "json"):
        age_in_store(store, f"cache/{old.name}.{suffix}", days=10)

    assert main(["cache", "gc", "--cache-dir", str(tmp_path / "cache"), "--older-than-days", "7",
                 "--store", str(tmp_path / "store")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["local"] == [old.name] and result["shared"] == [old.name]
    assert not any(p.exists() for p in cache.paths(old)) and all(p.exists() for p in cache.paths(new))
    assert not store.exists(f"cache/{old.name}.npy") and store.exists(f"cache/{new.name}.npy")


@pytest.mark.parametrize("age", ["nan", "-1", "inf", "1e10"])
def test_cache_gc_refuses_an_age_that_would_remove_everything_or_overflow(tmp_path, capsys, age):
    # NaN fails every comparison and -1 puts the cutoff in the future: each removed every entry,
    # in use or not, local and shared; inf and 1e10 ended in a traceback (OverflowError), exit 1.
    import json

    from protein.cli import main
    from protein.storage import open_store

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    store = open_store(str(tmp_path / "store"))
    cache = ImageCache(tmp_path / "cache")
    key = CacheKey("fresh", "train", 16)
    cache.build(load_competition(root), "train", 16, key=key, shared=store)
    capsys.readouterr()
    for dry_run in ([], ["--dry-run"]):
        assert main(["cache", "gc", "--cache-dir", str(tmp_path / "cache"), "--older-than-days", age,
                     "--store", str(tmp_path / "store"), *dry_run]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "--older-than-days must be a number of days" in err, err
    assert all(p.exists() for p in cache.paths(key)) and store.exists(f"cache/{key.name}.json")
    assert json.loads(store.get_bytes(f"cache/{key.name}.json"))


def age_in_store(store, key: str, days: float) -> None:
    """Dates a LocalStore object `days` back, as its listing shows it."""
    path = store.root / key
    then = time.time() - days * 86400
    os.utime(path, (then, then))


class _RacingStore:
    """A LocalStore on which `cache gc --store --older-than-days 0` lands between pull()'s downloads
    of the array and of its ids file (the store has no lock that would keep them apart)."""

    def __init__(self, root):
        from protein.storage import LocalStore

        self.inner = LocalStore(root)
        self.uri = self.inner.uri

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_file(self, key, path):
        out = self.inner.get_file(key, path)
        if key.endswith(".npy"):
            # The entry made old (its upload's time in the store, as gc_store reads it), then collected.
            age_in_store(self.inner, key[: -len(".npy")] + ".json", days=10)
            assert ImageCache.gc_store(self.inner, 1), "the race did not happen: nothing was collected"
        return out


def test_an_entry_collected_from_the_store_mid_pull_is_decoded_here(tmp_path):
    from protein.storage import LocalStore

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4", "3": "6"}, ["9"], size=16)
    data = load_competition(root)
    built = np.array(ImageCache(tmp_path / "cpu").build(data, "train", 16, shared=LocalStore(tmp_path / "store")))
    gpu = ImageCache(tmp_path / "gpu")
    pulled = gpu.build(data, "train", 16, shared=_RacingStore(tmp_path / "store"))
    np.testing.assert_array_equal(np.asarray(pulled), built)
    assert gpu.load(CacheKey(fingerprint(data.source), "train", 16), data.train_ids) is not None


def test_a_shared_entry_the_store_refuses_is_decoded_here(tmp_path, monkeypatch):
    from protein.errors import IntegrityError
    from protein.storage import LocalStore

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    store = LocalStore(tmp_path / "store")
    built = np.array(ImageCache(tmp_path / "cpu").build(data, "train", 16, shared=store))

    def corrupt(key, path):
        raise IntegrityError(f"{key}: does not match its recorded SHA-256")

    monkeypatch.setattr(store, "get_file", corrupt)
    np.testing.assert_array_equal(np.asarray(ImageCache(tmp_path / "gpu").build(data, "train", 16, shared=store)),
                                  built)


KILLED_BUILD = """
import pathlib, sys, time
import protein.cache
from protein.data import load_competition

def hang(source, rels, image_size, out, *args, **kwargs):
    out[0] = 1  # the temp file exists and holds pixels: then the host kills the run (OOM, preemption)
    pathlib.Path(sys.argv[3]).touch()
    time.sleep(600)

protein.cache.decode_all = hang
protein.cache.ImageCache(sys.argv[2]).build(load_competition(sys.argv[1]), "train", 16, workers=1)
"""


def test_cache_gc_removes_the_temp_file_of_a_killed_build(tmp_path, capsys, protein_process):
    import json
    import os
    import signal
    import time

    from protein.cli import main

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    cache_dir, started = tmp_path / "cache", tmp_path / "decoding"
    child = protein_process.start_script(KILLED_BUILD, str(root), str(cache_dir), str(started))
    try:
        _wait_for(started, "the build never started decoding")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    [temp] = cache_dir.glob(".*.npy.*.tmp")
    assert temp.stat().st_size > 0

    args = ["cache", "gc", "--cache-dir", str(cache_dir), "--older-than-days", "0"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["local"] == [] and temp.exists(), "a temp file written just now stays"
    two_days_ago = time.time() - 2 * 86400
    os.utime(temp, (two_days_ago, two_days_ago))
    assert main([*args[:-1], "1"]) == 0
    assert json.loads(capsys.readouterr().out)["local"] == [temp.name]
    assert not temp.exists()


class _NoCacheReads:
    """A LocalStore whose shared cache's files may be listed and deleted, never read: a GPU host
    writes them, and may make them any size."""

    def __init__(self, root):
        from protein.storage import LocalStore

        self.inner = LocalStore(root)
        self.uri = self.inner.uri

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def get_bytes(self, key, **kwargs):
        assert not key.startswith("cache/"), f"gc read {key}"
        return self.inner.get_bytes(key, **kwargs)


def test_store_gc_ages_entries_by_the_stores_clock_never_by_what_their_pusher_wrote(tmp_path):
    import datetime as dt

    from protein.storage import LocalStore

    store = LocalStore(tmp_path / "store")
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=3650)).isoformat()
    for name, days in (("old", 10), ("new", 0)):
        store.put_bytes(f"cache/{name}.npy", b"x" * 16)
        store.put_bytes(f"cache/{name}.json", json.dumps({"ids": ["1"], "created": future}).encode())
        for suffix in ("npy", "json"):
            age_in_store(store, f"cache/{name}.{suffix}", days)
    # Arrays whose ids file never came: a push killed between its two uploads, and one still going.
    for name, days in (("killed", 2), ("uploading", 0.01)):
        store.put_bytes(f"cache/{name}.npy", b"x" * 16)
        age_in_store(store, f"cache/{name}.npy", days)
    reading_nothing = _NoCacheReads(tmp_path / "store")
    assert ImageCache.gc_store(reading_nothing, 1, dry_run=True) == ["killed", "old"]
    assert ImageCache.gc_store(reading_nothing, 1) == ["killed", "old"]
    assert sorted(store.list("cache/")) == ["cache/new.json", "cache/new.npy", "cache/uploading.npy"]
    # Even at 0 days an array whose ids file may still be on its way stays its hour.
    assert ImageCache.gc_store(reading_nothing, 0) == ["new"]
    assert store.list("cache/") == ["cache/uploading.npy"]


def test_a_full_disk_fails_the_cache_build_with_one_line_not_a_bus_error(tmp_path, monkeypatch):
    """A memory-mapped write to a full disk is SIGBUS, not an OSError: the space is reserved
    before the first page is written, so a full disk is a ProteinError (the CLI's one line) naming
    the entry, and no temp file is left to keep the disk full."""
    import errno

    from protein.errors import ProteinError

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")

    def disk_full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    monkeypatch.setattr("protein.cache.decode_all", lambda *a, **k: pytest.fail("decoded into unreserved pages"))
    with pytest.raises(ProteinError) as raised:
        cache.build(data, "train", 16)
    message = str(raised.value)
    array_path = cache.paths(CacheKey(fingerprint(data.source), "train", 16))[0]
    assert "\n" not in message and message.startswith(f"{array_path}: no space left")
    assert "PROTEIN_CACHE_DIR" in message and "PROTEIN_CACHE_MAX_GB" in message
    assert [p.suffix for p in cache.root.iterdir()] == [".lock"]  # no temp file, no entry


@pytest.mark.parametrize("platform", ["filesystem without it", "macOS: no posix_fallocate"])
def test_a_filesystem_without_fallocate_checks_the_free_space(tmp_path, monkeypatch, platform):
    import errno
    import shutil
    from collections import namedtuple

    from protein.errors import ProteinError

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    if platform.startswith("macOS"):  # os has no such function there: an AttributeError traceback
        monkeypatch.delattr(os, "posix_fallocate")
    else:
        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    # 2 images of 64x64x3 bytes: more than the one block the header takes, which is all that is allocated.
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 100))
    with pytest.raises(ProteinError, match="no space left"):
        ImageCache(tmp_path / "cache").build(data, "train", 64)
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".lock"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 0, 10**9))
    assert ImageCache(tmp_path / "cache").build(data, "train", 64).shape == (2, 64, 64, 3)
