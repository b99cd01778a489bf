"""`protein datasets remove` in a local-folder store: a dataset nothing uses goes (its objects become gc's
orphans, shared ones stay), one a channel, a version or a live run uses is refused, and it waits for pushes
and gc exactly as gc does."""

import json
import os
import re
import time
import uuid

import pytest

from protein.cli import main as protein_main
from protein.data import fingerprint, open_dataset
from protein.data.channels import advance_channel
from protein.data.dataset_gc import collect_orphans
from protein.data.dataset_removal import DatasetUses, reasons_kept, remove_dataset
from protein.data.gc_coordination import GC_LOCK_KEY, PUSHES_PREFIX, GcLock, PushMarker
from protein.data.manifest import OBJECTS_PREFIX, manifest_key
from protein.data.push import push_dataset
from protein.data.run_resolution import resolution_key
from protein.errors import StoreBusy
from protein.registry import Registry
from protein.storage import open_store
from protein.validation.reference import report_key
from tests.helpers import write_dataset, write_png

LABELS = {"1": "0", "2": "6 4", "3": "9", "4": "1"}
TEST_IDS = ["12", "10"]
DAY_S = 86400


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def store(tmp_path):
    return open_store(str(tmp_path / "store"))


def objects(store):
    return set(store.list(f"{OBJECTS_PREFIX}/"))


def age(store, keys, seconds):
    then = time.time() - seconds
    for key in keys:
        os.utime(store.root / key, (then, then))


def remove_cli(store, *args):
    """`protein datasets remove` on a store its runs use too (it names itself as the models store)."""
    return protein_main(["datasets", "remove", "--store", store.uri, "--models-store", store.uri, *args])


def on_channel(store, channel, pushed):
    advance_channel(store, channel, pushed.uri, pushed.fingerprint, str(uuid.uuid4()), "test", "2026-01-01T00:00:00Z")


@pytest.fixture
def old_and_new(tmp_path, store):
    """Two pushes on channel latest; the second adds two images, so they share every object but train.csv."""
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    old = push_dataset(str(data), store)
    on_channel(store, "latest", old)
    old_objects = objects(store)
    with open(data / "train.csv", "a") as f:
        for i in range(2):
            f.write(f"n{i},3\n")
            write_png(data / "train" / f"n{i}.png", seed=700 + i)
    new = push_dataset(str(data), store)
    on_channel(store, "latest", new)
    return old, new, old_objects


def test_removing_an_old_dataset_lets_gc_free_its_own_objects_and_keep_the_shared_ones(store, old_and_new):
    old, new, old_objects = old_and_new
    age(store, objects(store), 3 * DAY_S)
    assert collect_orphans(store, DAY_S)["deleted"] == 0  # before: every object is named, gc frees nothing

    outcome = remove_dataset(store, old.fingerprint, yes=True, models_stores=[store])
    assert outcome["removed"] and outcome["keys"] == 1 and "datasets gc" in outcome["note"]
    assert not store.list(f"datasets/{old.fingerprint}/")
    freed = collect_orphans(store, DAY_S)
    assert freed["deleted"] == 1  # the old train.csv: the images are the new dataset's too
    assert objects(store) == named_by(store, new.fingerprint) and len(old_objects - objects(store)) == 1
    source = open_dataset(new.uri)
    assert fingerprint(source) == new.fingerprint
    for name in source.fingerprint_files():
        source.read_bytes(name)


def named_by(store, fp):
    doc = json.loads(store.get_bytes(manifest_key(fp)))
    return {f"{OBJECTS_PREFIX}/{e['sha256'][:2]}/{e['sha256']}" for e in doc["files"].values()}


def test_a_dry_run_deletes_nothing_and_the_cli_removes_with_yes(store, old_and_new, capsys):
    old, _, _ = old_and_new
    before = store.list("")
    assert remove_cli(store, old.fingerprint) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["dry_run"] and not printed["removed"] and printed["fingerprint"] == old.fingerprint
    assert store.list("") == before
    assert remove_cli(store, old.fingerprint, "--yes") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["removed"]
    assert manifest_key(old.fingerprint) not in store.list("datasets/")
    assert GC_LOCK_KEY not in store.list("datasets/")


def refused(store, fp, capsys, reason):
    """Refused (exit 9, one line naming the reason), dry run or not, nothing deleted, the lock released."""
    before = store.list("")
    for extra in ([], ["--yes"]):
        assert remove_cli(store, fp, *extra) == 9
        err = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
        assert len(err) == 1 and "still in use, nothing removed" in err[0] and reason in err[0], err
    assert store.list("") == before


def test_the_head_of_any_channel_is_refused(store, old_and_new, capsys):
    old, new, _ = old_and_new
    refused(store, new.fingerprint, capsys, "head of channel 'latest'")
    on_channel(store, "nightly", old)  # the old data is the head of another channel
    refused(store, old.fingerprint, capsys, "head of channel 'nightly'")


def refuse_by_validation(store, fp):
    """A failing validation report for ``fp`` in ``store``, as a validate run leaves it."""
    store.put_bytes(report_key(fp), json.dumps({"success": False, "profile": {}}).encode())


@pytest.mark.parametrize("verdict_in", ["data store", "models store"])
def test_what_runs_get_after_a_head_validation_refused_is_refused(tmp_path, store, old_and_new, capsys, verdict_in):
    """The head ``new`` failed validation, so runs resolving the channel pass it over and train on ``old``
    (protein.data.channels.resolve_data); the verdict is in the store the runs write theirs to."""
    old, new, _ = old_and_new
    reason = "what runs resolving channel 'latest' train on (its newer pushes were refused by validation"
    targets = {("latest", "s3://models"): old.fingerprint}
    assert reasons_kept(old.fingerprint, DatasetUses({"latest": new.fingerprint}, {}, [], targets)) == [
        f"{reason}, verdicts in s3://models)"]
    if verdict_in == "data store":
        refuse_by_validation(store, new.fingerprint)
        refused(store, old.fingerprint, capsys, f"{reason}, verdicts in {store.uri})")
        return
    models = open_store(str(tmp_path / "models"))
    models.put_bytes("registry/champion.json", b"{}")  # the models store is the one with a registry
    refuse_by_validation(models, new.fingerprint)
    assert remove_cli(store, old.fingerprint) == 0  # runs in the data store itself would train on new
    with pytest.raises(StoreBusy, match=re.escape(f"{reason}, verdicts in {models.uri})")):
        remove_dataset(store, old.fingerprint, models_stores=[models])


def test_the_data_of_a_registered_version_is_refused(tmp_path, store, old_and_new, capsys):
    old, _, _ = old_and_new
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights" * 100)
    Registry(store).register(weights, {"arch": "resnet18", "image_size": 32, "data_fingerprint": old.fingerprint},
                             version="v1")
    refused(store, old.fingerprint, capsys, "data of model version(s) v1")


def resolve(store, fp):
    key = resolution_key(str(uuid.uuid4()))
    doc = {"format": "protein-run-resolution/1", "data": "channel:latest",
           "resolved": {"uri": f"{store.uri}/datasets/{fp}/", "fingerprint": fp, "channel": "latest"}}
    store.put_bytes(key, json.dumps(doc).encode())
    return key


def test_a_young_run_resolution_is_refused_and_an_old_one_is_not(store, old_and_new, capsys):
    old, _, _ = old_and_new
    key = resolve(store, old.fingerprint)
    refused(store, old.fingerprint, capsys, f"run resolution {store.uri}/{key} (resolved to it")
    age(store, [key], DAY_S + 60)  # a run resolved more than a day ago: finished, as far as the store can tell
    assert remove_dataset(store, old.fingerprint, yes=True, models_stores=[store])["removed"]


def test_versions_and_resolutions_in_the_models_store_runs_write_to_keep_the_dataset(tmp_path, store, old_and_new,
                                                                                      capsys):
    """Split stores: runs on ``<data store>/datasets@latest`` with ``store=<models store>`` write their
    resolutions and versions to the models store; read from the data store alone, nothing used the data."""
    old, _, _ = old_and_new
    models = open_store(str(tmp_path / "models"))
    models.put_bytes("registry/champion.json", b"{}")  # the models store is the one with a registry
    before = store.list("")
    assert protein_main(["datasets", "remove", "--store", store.uri, old.fingerprint, "--yes"]) == 2
    err = capsys.readouterr().err
    assert (f"{store.uri} holds no model registry (registry/, models/), so the runs that train on its datasets "
            "may record their versions and resolutions in another store: name it with --models-store URI") in err
    assert store.list("") == before

    mistyped = open_store(str(tmp_path / "modles"))
    mistyped.put_bytes("datasets/channels/unrelated.json", b"{}")  # exists, but no registry
    assert protein_main(["datasets", "remove", "--store", store.uri, "--models-store", mistyped.uri,
                         old.fingerprint, "--yes"]) == 2
    assert f"--models-store {mistyped.uri} holds no model registry" in capsys.readouterr().err
    assert store.list("") == before

    key = resolve(models, old.fingerprint)
    for extra in ([], ["--yes"]):
        assert protein_main(["datasets", "remove", "--store", store.uri, "--models-store", models.uri,
                             old.fingerprint, *extra]) == 9
        assert f"run resolution {models.uri}/{key} (resolved to it" in capsys.readouterr().err
    age(models, [key], DAY_S + 60)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"weights" * 100)
    Registry(models).register(weights, {"arch": "resnet18", "image_size": 32, "data_fingerprint": old.fingerprint},
                              version="v1")
    with pytest.raises(StoreBusy, match=f"data of model version\\(s\\) v1 in {models.uri}"):
        remove_dataset(store, old.fingerprint, yes=True, models_stores=[models])
    assert store.list("") == before


@pytest.mark.parametrize("holder", ["gc lock", "push marker"])
def test_a_held_gc_lock_or_a_live_push_is_busy_and_nothing_is_deleted(store, old_and_new, capsys, holder):
    old, _, _ = old_and_new
    before = store.list("")
    if holder == "gc lock":
        lock = GcLock.acquire(store)
        try:
            assert remove_cli(store, old.fingerprint, "--yes") == 9
        finally:
            lock.release()
        assert "another datasets gc holds" in capsys.readouterr().err
        assert store.list("") == before
        return
    with PushMarker(store):
        assert remove_cli(store, old.fingerprint, "--yes") == 9
        assert [k for k in store.list("") if not k.startswith(PUSHES_PREFIX)] == before
    assert "removed nothing: 1 push(es) in progress" in capsys.readouterr().err
    assert store.list("") == before  # the lock released, the manifest there


def test_a_push_moves_its_channel_while_its_marker_keeps_removal_away(tmp_path, store, monkeypatch):
    import protein.data.channels

    markers_at_move: list[list[str]] = []
    real = protein.data.channels.advance_channel

    def watching(*args, **kwargs):
        markers_at_move.append(store.list(PUSHES_PREFIX))
        return real(*args, **kwargs)

    monkeypatch.setattr(protein.data.channels, "advance_channel", watching)
    data = write_dataset(tmp_path / "d", LABELS, TEST_IDS)
    for _ in range(2):  # a first push, then the same data again (already pushed)
        assert protein_main(["datasets", "push", "--data", str(data), "--store", store.uri]) == 0
    assert len(markers_at_move) == 2 and all(len(found) == 1 for found in markers_at_move)
    assert not store.list(PUSHES_PREFIX)


def test_a_run_resolving_the_dataset_while_it_is_removed_is_said_loudly(store, old_and_new, monkeypatch):
    old, _, _ = old_and_new
    real_delete = store.delete

    def delete_while_a_run_resolves(key):
        if key == manifest_key(old.fingerprint):
            resolve(store, old.fingerprint)  # a run that read the channel before the checks
        real_delete(key)

    monkeypatch.setattr(store, "delete", delete_while_a_run_resolves)
    with pytest.raises(StoreBusy, match="its manifest was deleted, but a use appeared meanwhile: run resolution"):
        remove_dataset(store, old.fingerprint, yes=True, models_stores=[store])
    assert GC_LOCK_KEY not in store.list("datasets/")


def test_what_is_not_a_dataset_is_one_line(store, old_and_new, capsys):
    assert remove_cli(store, "0123456789abcdef", "--yes") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protein datasets: error: {store.uri}/datasets/0123456789abcdef/: no dataset (no manifest.json); "
                   "`protein datasets list` shows the datasets in the store"]
    assert remove_cli(store, "objects") == 2
    assert "is not a dataset fingerprint" in capsys.readouterr().err


def test_an_old_full_copy_is_removed_whole(tmp_path, store):
    from bench.dataset_push import push_full_copy

    fp = push_full_copy(str(write_dataset(tmp_path / "full", LABELS, TEST_IDS)), store)
    assert len(store.list(f"datasets/{fp}/")) > 1
    assert remove_dataset(store, fp, yes=True, models_stores=[store])["format"] == "protein-dataset/1"
    assert store.list("datasets/") == []
