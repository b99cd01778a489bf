"""An atomic write leaves the file with the mode a plain write gives (0o666 less the umask): its temp
file was mkstemp's 0600, kept by os.replace, so `--out submission.csv` over a 0644 file made it 0600."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from protein.atomic import write_bytes_atomic


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
