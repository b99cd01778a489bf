"""Content-addressed datasets in a local-folder store: a push uploads what changed, readers go through
the manifest, old full copies still open, gc keeps what a manifest names, damage is one line."""

import json
import os
import time

import pytest

from bench.dataset_push import push_full_copy
from protein.cli import main as protein_main
from protein.data import fingerprint, load_competition, open_dataset
from protein.data.dataset_gc import apply_objects_gc, plan_objects_gc
from protein.data.manifest import OBJECTS_PREFIX, manifest_key, object_key
from protein.data.push import push_dataset
from protein.errors import IntegrityError, StoreError
from protein.storage import open_store
from tests.helpers import write_dataset, write_png

LABELS = {"1": "0", "2": "6 4", "3": "9", "4": "1"}
TEST_IDS = ["12", "10"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def grown(folder, extra):
    """The same dataset plus `extra` train images (train.csv lists them)."""
    with open(folder / "train.csv", "a") as f:
        for i in range(extra):
            f.write(f"n{i},3\n")
            write_png(folder / "train" / f"n{i}.png", seed=500 + i)
    return folder


def objects(store):
    return set(store.list(f"{OBJECTS_PREFIX}/"))


def age(store, keys, seconds):
    then = time.time() - seconds
    for key in keys:
        os.utime(store.root / key, (then, then))


def test_a_second_push_uploads_only_the_changed_files_and_reads_back(tmp_path, store):
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    first = push_dataset(str(data), store)
    assert first.uploaded == first.files == 2 + len(LABELS) + len(TEST_IDS)
    assert store.list(f"datasets/{first.fingerprint}/") == [manifest_key(first.fingerprint)]

    writes: list[str] = []
    real_put = store.put_bytes

    def counting_put(key, data, **kwargs):
        writes.append(key)
        return real_put(key, data, **kwargs)

    store.put_bytes = counting_put
    second = push_dataset(str(grown(data, 3)), store)
    # Three new images and the new train.csv; everything else is already stored by content and not even
    # attempted (the listing said so); the manifest last. First the push marker that keeps gc away.
    assert second.uploaded == 4 and second.files == first.files + 3
    assert writes[0].startswith("datasets/pushes/") and not store.list("datasets/pushes/")
    assert len(writes) == 6 and writes[-1] == manifest_key(second.fingerprint)
    assert len(objects(store)) == first.files + 4

    source = open_dataset(second.uri)
    assert fingerprint(source) == second.fingerprint == fingerprint(open_dataset(data))
    assert source.read_bytes("train/n2.png") == (data / "train" / "n2.png").read_bytes()
    assert load_competition(first.uri).train_ids == list(LABELS)  # the first dataset is still whole


def test_a_re_push_hashes_only_new_or_changed_files(tmp_path, store, monkeypatch):
    import protein.data.digests

    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    push_dataset(str(data), store)
    hashed: list[tuple[str, str]] = []
    real = protein.data.digests.hash_file

    def counting(path, algorithm="md5"):
        hashed.append((path.name, algorithm))
        return real(path, algorithm)

    monkeypatch.setattr(protein.data.digests, "hash_file", counting)
    push_dataset(str(grown(data, 2)), store)
    # train.csv and the two new images, once for the fingerprint and once for their object names.
    assert sorted(hashed) == sorted((name, algorithm) for name in ("train.csv", "n0.png", "n1.png")
                                    for algorithm in ("md5", "sha256"))


def test_an_old_full_copy_dataset_still_opens(tmp_path, store):
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    fp = push_full_copy(str(data), store)
    assert f"datasets/{fp}/train/1.png" in store.list(f"datasets/{fp}/")
    source = open_dataset(str(store.root / "datasets" / fp))
    assert fingerprint(source) == fp and source.read_bytes("test/10.png") == (data / "test/10.png").read_bytes()
    again = push_dataset(str(data), store)  # same data: recognised, nothing rewritten in the new format
    assert again.already_pushed and again.uploaded == 0 and not objects(store)


def test_gc_deletes_old_orphans_and_never_what_a_manifest_names(tmp_path, store):
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    pushed = push_dataset(str(data), store)
    named = objects(store)
    old_orphan = object_key("a" * 64)
    young_orphan = object_key("b" * 64)
    store.put_bytes(old_orphan, b"left by a push that died")
    store.put_bytes(young_orphan, b"a push in flight")
    store.put_bytes(f"{OBJECTS_PREFIX}/aa/not-ours", b"a key gc did not make")
    age(store, named | {old_orphan, f"{OBJECTS_PREFIX}/aa/not-ours"}, 3 * 86400)

    plan = plan_objects_gc(store, min_age_s=86400)
    assert plan.orphans == [old_orphan] and plan.young == [young_orphan] and plan.datasets == 1
    assert apply_objects_gc(store, plan) == 1
    assert objects(store) == named | {young_orphan, f"{OBJECTS_PREFIX}/aa/not-ours"}
    assert fingerprint(open_dataset(pushed.uri)) == pushed.fingerprint
    for name in open_dataset(pushed.uri).fingerprint_files():  # every named object is still readable
        open_dataset(pushed.uri).read_bytes(name)


def test_gc_keeps_what_a_manifest_written_after_the_plan_names(tmp_path, store):
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    pushed = push_dataset(str(data), store)
    keys = objects(store)
    store.delete(manifest_key(pushed.fingerprint))  # the dataset is forgotten: all its objects are orphans
    age(store, keys, 3 * 86400)
    plan = plan_objects_gc(store, min_age_s=3600)
    assert set(plan.orphans) == keys
    again = push_dataset(str(data), store)  # a push reusing those objects lands before the delete
    assert again.uploaded == 0
    assert apply_objects_gc(store, plan) == 0
    assert objects(store) == keys


def test_gc_reads_each_manifest_once_and_before_deleting_only_those_written_since(tmp_path, store, monkeypatch):
    """A manifest is written once, so the re-read before deleting parses only new ones: a year of
    daily pushes no longer costs every manifest twice per gc."""
    from protein.data import dataset_gc

    first = push_dataset(str(write_dataset(tmp_path / "d1", LABELS, TEST_IDS)), store)
    orphan = object_key("a" * 64)
    store.put_bytes(orphan, b"left by a push that died")
    age(store, objects(store), 3 * 86400)
    read: list[str] = []
    real_load = dataset_gc.load_record

    def counted_load(st, key, schema):
        read.append(key)
        return real_load(st, key, schema)

    monkeypatch.setattr(dataset_gc, "load_record", counted_load)

    plan = plan_objects_gc(store, min_age_s=86400)
    assert read == [manifest_key(first.fingerprint)] and plan.orphans == [orphan]
    second = push_dataset(str(write_dataset(tmp_path / "d2", {**LABELS, "99": "1"}, TEST_IDS)), store)
    read.clear()
    assert apply_objects_gc(store, plan) == 1
    assert read == [manifest_key(second.fingerprint)]  # only the manifest written since the plan


def test_gc_stops_on_a_manifest_it_cannot_read(tmp_path, store, capsys):
    store.put_bytes(object_key("a" * 64), b"orphan")
    age(store, [object_key("a" * 64)], 3 * 86400)
    store.put_bytes(manifest_key("f" * 16), b"{not json")
    assert protein_main(["datasets", "gc", "--store", store.uri, "--older-than-hours", "1"]) == 8
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gc deletes nothing while a dataset manifest cannot be read" in err[0]
    assert objects(store) == {object_key("a" * 64)}
    assert not store.exists("datasets/gc.lock")  # released on the way out, so the next gc may run


def test_a_missing_or_corrupt_object_is_one_line_naming_dataset_file_and_key(tmp_path, store, capsys):
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    pushed = push_dataset(str(data), store)
    manifest = json.loads(store.get_bytes(manifest_key(pushed.fingerprint)))
    key = object_key(manifest["files"]["train/2.png"]["sha256"])
    size = (store.root / key).stat().st_size
    (store.root / key).write_bytes(bytes(size))  # same size, other bytes: only the SHA-256 tells
    with pytest.raises(IntegrityError, match=rf"datasets/{pushed.fingerprint} file train/2.png: content object "
                                             rf".*{key} does not match its SHA-256"):
        open_dataset(pushed.uri).read_bytes("train/2.png")
    store.delete(key)
    with pytest.raises(StoreError, match=rf"datasets/{pushed.fingerprint} file train/2.png: content object "
                                         rf".*{key} is missing from the store"):
        open_dataset(pushed.uri).read_bytes("train/2.png")
    capsys.readouterr()
    assert protein_main(["validate", "--data", pushed.uri]) == 3  # StoreError's documented exit code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"file train/2.png: content object {store.root / key} is missing" in err[0]

    repaired = push_dataset(str(data), store)  # pushing the same data again puts back what is missing
    assert repaired.already_pushed and repaired.uploaded == 1
    assert open_dataset(pushed.uri).read_bytes("train/2.png") == (data / "train" / "2.png").read_bytes()


def test_decode_cache_builds_from_a_pushed_dataset(tmp_path, store):
    import numpy as np

    from protein.cache import ImageCache

    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    pushed = push_dataset(str(data), store)
    built = ImageCache(tmp_path / "decoded").build(load_competition(pushed.uri), "train", 16)
    local = ImageCache(tmp_path / "decoded-local").build(load_competition(str(data)), "train", 16)
    assert np.array_equal(np.asarray(built), np.asarray(local))


def test_a_push_that_cannot_store_an_object_writes_no_manifest(tmp_path, store):
    import hashlib

    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    squatted = object_key(hashlib.sha256((data / "train" / "3.png").read_bytes()).hexdigest())
    store.put_bytes(squatted, b"other bytes under that name")
    with pytest.raises(StoreError, match=rf"{squatted}: content object for train/3.png holds other bytes"):
        push_dataset(str(data), store)
    assert [key for key in store.list("datasets/") if key.endswith("manifest.json")] == []


@pytest.mark.parametrize("hours", ["-1", "nan"])
def test_a_bad_age_guard_is_one_line_and_takes_no_lock(tmp_path, store, capsys, hours):
    store.put_bytes(object_key("a" * 64), b"orphan")
    assert protein_main(["datasets", "gc", "--store", store.uri, "--older-than-hours", hours]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protein datasets: error: the gc age guard must be >= 0 hours, got {float(hours):g}"]
    assert objects(store) == {object_key("a" * 64)} and store.list("datasets/") == [object_key("a" * 64)]


def test_gc_stops_on_a_store_folder_it_cannot_list(tmp_path, store, capsys, monkeypatch):
    """os.walk skipped an unreadable datasets/<fp>/ (another user's umask 077 on a shared store) as
    empty: the dataset looked incomplete and gc deleted every object it names."""
    pushed = push_dataset(str(write_dataset(tmp_path / "d", LABELS, TEST_IDS)), store)
    named = objects(store)
    age(store, named, 3 * 86400)
    hidden = store.root / "datasets" / pushed.fingerprint
    real_scandir = os.scandir

    def scandir(path=None):
        if os.fspath(path) == str(hidden):  # chmod does not deny root, which runs these tests
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(StoreError, match=f"^{hidden}: cannot list this store folder \\(Permission denied\\)$"):
        store.list("datasets/")
    assert protein_main(["datasets", "gc", "--store", store.uri, "--older-than-hours", "1"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protein datasets: error: {hidden}: cannot list this store folder (Permission denied)"]
    monkeypatch.setattr(os, "scandir", real_scandir)
    assert objects(store) == named
    assert not store.exists("datasets/gc.lock")


def test_a_file_given_as_the_store_is_refused(tmp_path, capsys):
    """A file as --store listed as an empty store: `datasets list` said "no datasets" and gc exited 0."""
    not_a_store = tmp_path / "passwd"
    not_a_store.write_text("root:x:0:0\n")
    for verb in (["datasets", "list"], ["datasets", "gc"], ["models", "gc"]):
        assert protein_main([*verb, "--store", str(not_a_store)]) == 3, verb
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(not_a_store) in err[0], (verb, err)
    assert open_store(str(tmp_path / "never-written")).list("datasets/") == []
    assert not_a_store.read_text() == "root:x:0:0\n"
