"""The Makefile's install installs only what requirements.lock pins, hash-checked."""

from __future__ import annotations

from tests.helpers import REPO


def test_the_project_is_built_with_the_locked_setuptools_not_downloaded_ones() -> None:
    """`pip install -e .` with build isolation downloads the newest setuptools and wheel into a
    throwaway environment to build with: unpinned and unchecked. The lock installs both first."""
    makefile = (REPO / "Makefile").read_text()
    [project_install] = [line for line in makefile.splitlines() if "pip install" in line and "-e ." in line]
    assert "--no-deps" in project_install and "--no-build-isolation" in project_install, project_install
    lock = (REPO / "requirements.lock").read_text().splitlines()
    assert any(line.startswith("setuptools==") for line in lock) and any(line.startswith("wheel==") for line in lock)
