"""The cache folder follows the platform convention unless $PROTEIN_CACHE_DIR says otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from protein.cli import main
from protein.locations import APP_NAME, default_cache_dir
from tests.helpers import write_dataset


def test_the_default_cache_is_the_per_user_cache_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROTEIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / APP_NAME


def test_protein_cache_dir_overrides_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"


def test_validate_writes_no_cache_into_the_folder_it_runs_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = write_dataset(tmp_path / "data", {f"t{i}": str(i % 10) for i in range(12)}, ["a", "b"])
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("PROTEIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    code = main(["validate", "--data", str(data), "--store", str(tmp_path / "store"), "--image-size", "32"])
    assert code == 0
    assert list(here.iterdir()) == []
    assert any((tmp_path / "xdg" / APP_NAME).rglob("*")), "the data layer's caches went to the per-user folder"
