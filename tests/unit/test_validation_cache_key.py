"""The validate-data cache key changes with what the verdict depends on besides the data: the
validation rules' source and the GX and Pillow versions; and cached verdicts expire."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import shutil
from pathlib import Path

import pytest

import protein.validation
from tasks import validation as task_module


@pytest.fixture(autouse=True)
def fresh_version() -> None:
    task_module.validation_code_version.cache_clear()
    yield
    task_module.validation_code_version.cache_clear()


def test_a_changed_rule_changes_the_code_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = task_module.validation_code_version()
    copy = tmp_path / "validation"
    shutil.copytree(Path(protein.validation.__file__).parent, copy)
    monkeypatch.setattr(protein.validation, "__file__", str(copy / "__init__.py"))
    task_module.validation_code_version.cache_clear()
    assert task_module.validation_code_version() == before  # same source, same version
    suites = copy / "suites.py"
    suites.write_text(suites.read_text().replace("each Image id must appear once", "ids may repeat"))
    task_module.validation_code_version.cache_clear()
    assert task_module.validation_code_version() != before


@pytest.mark.parametrize("library", ["great_expectations", "pillow", "protein-pipeline"])
def test_a_new_library_version_changes_the_code_version(library: str, monkeypatch: pytest.MonkeyPatch) -> None:
    before = task_module.validation_code_version()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "99.0" if name == library else real(name))
    task_module.validation_code_version.cache_clear()
    assert task_module.validation_code_version() != before


def test_cached_verdicts_expire() -> None:
    assert task_module.validate_data.cache_expiration == dt.timedelta(days=7)
