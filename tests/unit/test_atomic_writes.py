"""An atomic write leaves the file with the mode a plain write gives (0o666 less the umask): its temp
file was mkstemp's 0600, kept by os.replace, so `--out submission.csv` over a 0644 file made it 0600.

A durable write fsyncs the folder after its rename: the data was fsynced but the folder entry was
not, so a power loss soon after a promotion could bring back the previous champion.json."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from protein.atomic import write_bytes_atomic
from protein.storage import SHA256_METADATA, LocalStore, S3Store


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o027)  # the test's own; restored after
    try:
        yield
    finally:
        os.umask(previous)


def test_a_replaced_file_gets_the_mode_a_plain_write_gives(tmp_path: Path, umask: None) -> None:
    target = tmp_path / "submission.csv"
    target.write_bytes(b"old")
    target.chmod(0o644)
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    write_bytes_atomic(tmp_path / "fresh.csv", b"new")
    assert stat.S_IMODE((tmp_path / "fresh.csv").stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.csv", "submission.csv"]


@pytest.fixture
def disk_events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """("replace", target) and ("fsync", path of the fd) in the order they happen."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        events.append(("replace", os.path.abspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def assert_folder_fsynced_after(events: list[tuple[str, str]], target: Path) -> int:
    """The index of the fsync of `target`'s folder that follows its last rename."""
    renamed = max(i for i, event in enumerate(events) if event == ("replace", str(target)))
    later = [i for i, event in enumerate(events) if i > renamed and event == ("fsync", str(target.parent))]
    assert later, f"{target.parent} not fsynced after {target} was renamed into it: {events}"
    return later[0]


def test_a_store_write_fsyncs_the_sidecar_folder_then_the_object_folder(
        tmp_path: Path, disk_events: list[tuple[str, str]]) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("registry/champion.json", b"old")
    disk_events.clear()
    store.put_bytes("registry/champion.json", b"new")
    sidecar = store.root / ".protein+meta" / "sha256" / "registry" / "champion.json"
    target = store.root / "registry" / "champion.json"
    sidecar_synced = assert_folder_fsynced_after(disk_events, sidecar)
    # The sidecar's rename is on disk before the object's: a power loss never keeps a new object
    # beside an old sidecar.
    assert sidecar_synced < disk_events.index(("replace", str(target)))
    assert_folder_fsynced_after(disk_events, target)


def test_a_new_store_folder_is_fsynced_in_its_parent(tmp_path: Path, disk_events: list[tuple[str, str]]) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a", b"first")
    disk_events.clear()
    store.put_bytes("models/v1/model.json", b"{}")
    synced = {path for kind, path in disk_events if kind == "fsync"}
    assert {str(store.root), str(store.root / "models")} <= synced


def test_store_downloads_fsync_their_folder(tmp_path: Path, disk_events: list[tuple[str, str]]) -> None:
    local = LocalStore(tmp_path / "store")
    local.put_bytes("models/v1/model.safetensors", b"weights")
    target = tmp_path / "local" / "model.safetensors"
    local.get_file("models/v1/model.safetensors", target)
    assert_folder_fsynced_after(disk_events, target)

    class OneObject:
        def get_object(self, **_: Any) -> dict[str, Any]:
            return {"Body": io.BytesIO(b"weights"),
                    "Metadata": {SHA256_METADATA: hashlib.sha256(b"weights").hexdigest()}}

    s3 = S3Store("bucket")
    s3._client_obj = OneObject()
    target = tmp_path / "from-s3" / "model.safetensors"
    s3.get_file("models/v1/model.safetensors", target)
    assert target.read_bytes() == b"weights"
    assert_folder_fsynced_after(disk_events, target)


def test_durable_atomic_writes_fsync_the_folder_and_caches_do_not(
        tmp_path: Path, disk_events: list[tuple[str, str]]) -> None:
    target = tmp_path / "out" / "submission.csv"
    write_bytes_atomic(target, b"id,label\n")
    assert_folder_fsynced_after(disk_events, target)
    disk_events.clear()
    write_bytes_atomic(tmp_path / "cache.json", b"{}", durable=False)
    assert ("fsync", str(tmp_path)) not in disk_events


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_full_disk_names_the_file_being_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  failing: str) -> None:
    """write() and fsync() on a full disk raise an OSError naming no file: the CLI's one line must
    still say which file it was."""
    import errno

    from protein.cli import os_error_line

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full) if failing == "write" else monkeypatch.setattr(
        os, "fsync", disk_full)
    target = tmp_path / "submission.csv"
    with pytest.raises(OSError) as raised:
        write_bytes_atomic(target, b"new")
    assert raised.value.errno == errno.ENOSPC
    assert os_error_line(raised.value) == f"{target}: No space left on device"
    assert list(tmp_path.iterdir()) == []
