"""The PostgreSQL superuser's password file of the stack's cluster (deployments/ha_stack/postgres.py)."""

from __future__ import annotations

import os
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


def test_the_password_file_is_created_private_and_new(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its mode at initdb's start says nothing of the moment before: written and then chmod-ed, it
    was readable by others in between. Created by os.open with 0600 (under umask 0, so the mode
    argument is what keeps it private) and O_EXCL (never one someone else created, and may hold open)."""
    real_open, created = os.open, []

    def recording_open(path: object, flags: int, mode: int = 0o777, *args: object, **kwargs: object) -> int:
        descriptor = real_open(path, flags, mode, *args, **kwargs)  # type: ignore[arg-type]
        if Path(str(path)).name == "pwfile":
            created.append((flags, mode, stat.S_IMODE(os.fstat(descriptor).st_mode)))
        return descriptor

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(postgres, "subprocess", SimpleNamespace(
        run=lambda argv, **kwargs: subprocess.CompletedProcess(argv, 0, "", "")))
    monkeypatch.setattr(postgres, "postgres_bin", lambda program: f"/usr/lib/postgresql/15/bin/{program}")
    umask = os.umask(0)
    try:
        postgres.Postgres(tmp_path / "pg").init()
    finally:
        os.umask(umask)
    assert len(created) == 1, f"pwfile created by os.open {len(created)} times: written some other way"
    [(flags, mode, at_creation)] = created
    assert flags & os.O_CREAT and flags & os.O_EXCL, flags
    assert mode == 0o600 and at_creation == 0o600, (oct(mode), oct(at_creation))
