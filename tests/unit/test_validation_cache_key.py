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


@pytest.mark.parametrize(("changed", "old", "new"), [
    ("validation/suites.py", "each Image id must appear once", "ids may repeat"),
    # The decoder whose verdict counts, and the label parser: outside protein/validation/, and a fix
    # to them kept old passes for a week (a checkout rarely bumps the project's version).
    ("data/png.py", "def decode_png", "def decode_png_changed"),
    ("labels.py", "def parse_label_set", "def parse_label_set_changed"),
    # The image id rule and the strict train.csv parser: a row refused or let through by them changes
    # the verdict as surely as a suite does.
    ("data/layout.py", "def check_image_id", "def check_image_id_changed"),
    ("data/tables.py", "def parse_labels_table", "def parse_labels_table_changed"),
])
def test_a_changed_rule_changes_the_code_version(changed: str, old: str, new: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    before = task_module.validation_code_version()
    project = Path(protein.validation.__file__).parents[1]
    copy = tmp_path / "protein"
    # The whole package, not VERDICT_RULES_OUTSIDE: a rule dropped from that tuple must fail the
    # assertion below, not go missing from the copy.
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(protein.validation, "__file__", str(copy / "validation" / "__init__.py"))
    task_module.validation_code_version.cache_clear()
    assert task_module.validation_code_version() == before  # same source, same version
    source = copy / changed
    assert old in source.read_text()
    source.write_text(source.read_text().replace(old, new))
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
