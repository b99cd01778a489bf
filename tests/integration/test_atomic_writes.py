"""Writers killed mid-write or mid-registration leave every object whole or absent, and what a
crash leaves behind is listed and collected, never misread."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import types
from typing import Any

import pytest

from protein.errors import IntegrityError, NotFound
from protein.registry import CHAMPION_KEY, Registry
from protein.storage import open_store
from tests.conftest import ProteinProcess
from tests.integration.reliability_common import IMAGE, ONE_THREAD, champion_weights, cli, last_json

pytestmark = pytest.mark.integration

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
