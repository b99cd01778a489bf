"""A train.csv without its header row (its first data row read as the header) fails validation on the
header expectation, naming the columns it needs, instead of crashing on the missing Image column."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from protein.cli import main
from tests.data.corpus import SIZE, write_base


def test_train_csv_without_header_row_is_reported_as_missing_its_header(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / "ds"
    shutil.copytree(write_base(tmp_path / "base"), data)
    lines = (data / "train.csv").read_text().splitlines(keepends=True)
    assert lines[0].strip() == "Image,Label"
    (data / "train.csv").write_text("".join(lines[1:]))

    code = main(["validate", "--data", str(data), "--image-size", str(SIZE), "--max-image-bytes", "200000",
                 "--store", str(tmp_path / "store"), "--report", str(tmp_path / "report")])
    _, err = capsys.readouterr()
    assert code == 1  # data failed validation, not a crash
    assert "Traceback" not in err and "zip()" not in err
    assert "train.csv must have exactly the columns Image,Label; e.g. 'train.csv' row 1 = " in err


def test_a_blank_first_line_fails_validation_as_the_loader_refuses_it(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The suite skipped a blank line 1 and read line 2 as the header, so "\\r\\nImage,Label\\r\\n..."
    passed validation and then failed to load in push and train: one rule for both now."""
    from protein.data import load_competition
    from protein.errors import DataError

    data = tmp_path / "ds"
    shutil.copytree(write_base(tmp_path / "base"), data)
    lines = (data / "train.csv").read_text().splitlines()
    (data / "train.csv").write_bytes(("\r\n" + "".join(f"{line}\r\n" for line in lines)).encode())

    code = main(["validate", "--data", str(data), "--image-size", str(SIZE), "--max-image-bytes", "200000",
                 "--report", str(tmp_path / "report")])
    _, err = capsys.readouterr()
    assert code == 1
    assert "train.csv line 1: blank; expected the header Image,Label" in err
    with pytest.raises(DataError, match=r"train\.csv line 1: blank; expected the header Image,Label$"):
        load_competition(data)
