"""bench/common.py helpers that the results files depend on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench.common import git_head


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_git_head_marks_a_checkout_with_a_modified_tracked_file_dirty(tmp_path: Path) -> None:
    git("init", "-q", "-b", "main", str(tmp_path), cwd=tmp_path)
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py", cwd=tmp_path)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=tmp_path)
    commit = git("rev-parse", "--short", "HEAD", cwd=tmp_path)
    (tmp_path / "notes.txt").write_text("untracked\n")  # not code the commit holds: still clean
    assert git_head(tmp_path) == commit
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_head(tmp_path) == f"{commit}-dirty"
