"""The PostgreSQL superuser's password file of the stack's cluster (deployments/ha_stack/postgres.py)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from deployments.ha_stack import postgres


def test_the_password_file_is_never_readable_by_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster's root is 0755 (the database user must get in): written with the default umask,
    the superuser's password was readable by every local user while initdb ran."""
    seen: list[int] = []

    def initdb(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        [option] = [a for a in argv if a.startswith("--pwfile=")]
        path = Path(option.removeprefix("--pwfile="))
        seen.append(stat.S_IMODE(path.stat().st_mode))
        assert path.read_text() == cluster.password
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(postgres, "subprocess", SimpleNamespace(run=initdb))  # this module's, not the process's
    monkeypatch.setattr(postgres, "postgres_bin", lambda program: f"/usr/lib/postgresql/15/bin/{program}")
    cluster = postgres.Postgres(tmp_path / "pg")
    cluster.init()
    assert seen and seen[0] & 0o077 == 0, oct(seen[0])
    assert not (tmp_path / "pg" / "pwfile").exists()
