"""The host's mirror of the Data Docs history (protein/validation/history.py): every later validation
copies a mirror file into its GX project as it is, so a file there is whole or absent."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from protein.storage.local import LocalStore
from protein.validation.history import ALL_RESULTS, upload_new

RESULT = "suite/run-a/20250101T000000.000000Z/batch.json"


def test_a_copy_into_the_mirror_cut_short_leaves_no_file_under_its_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GX project and the cache on different filesystems: no hard link, so a copy; a full disk
    stops it halfway. A later run skips a mirror file that exists, so half of one would be served
    to every later validation."""
    folder, mirror = tmp_path / "project", tmp_path / "mirror"
    result = folder / RESULT
    result.parent.mkdir(parents=True)
    result.write_bytes(b"{" + b"x" * 1000 + b"}")
    copy = shutil.copyfile

    def no_link(source: Path, target: Path) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def disk_full_halfway(source: Path, target: Path) -> None:
        Path(target).write_bytes(Path(source).read_bytes()[:500])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(shutil, "copyfile", disk_full_halfway)
    store = LocalStore(tmp_path / "store")
    assert upload_new(store, folder, "results", set(), ALL_RESULTS, mirror) == 1
    assert not (mirror / RESULT).exists()
    assert [p for p in mirror.rglob("*") if p.is_file()] == [], "nor a temp file beside it"

    monkeypatch.setattr(shutil, "copyfile", copy)  # the next run, with room again, mirrors it whole
    assert upload_new(store, folder, "results", set(), ALL_RESULTS, mirror) == 1
    assert (mirror / RESULT).read_bytes() == result.read_bytes()
