"""The conditional-write probe survives its own create-only write landing with the answer lost: the
client's retry met the probe itself (412), and the check failed with "already exists" on a key that was
random and new, leaving the probe behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from protein.errors import PreconditionFailed
from protein.storage import LocalStore
from protein.storage.s3_conditional_writes import PROBE_PREFIX, require_conditional_writes


class FirstAnswerLost(LocalStore):
    """The first create-only write lands with `landed`, and then the caller sees the retry's 412."""

    def __init__(self, root: Path, landed: bytes | None = None) -> None:
        super().__init__(root)
        self.landed = landed
        self.lost = False

    def put_bytes(self, key: str, data: bytes, **kwargs: object) -> str:
        if kwargs.get("if_none_match") and not self.lost:
            self.lost = True
            super().put_bytes(key, data if self.landed is None else self.landed)
            raise PreconditionFailed(f"{self.uri}/{key}: already exists")
        return super().put_bytes(key, data, **kwargs)  # type: ignore[arg-type]


def test_a_probe_whose_answer_was_lost_is_recognised_and_removed(tmp_path: Path) -> None:
    store = FirstAnswerLost(tmp_path / "store")
    assert require_conditional_writes(store) is True
    assert store.lost
    assert store.list(f"{PROBE_PREFIX}/") == []


def test_a_412_over_someone_elses_bytes_is_still_refused(tmp_path: Path) -> None:
    store = FirstAnswerLost(tmp_path / "store", landed=b"not the probe")
    with pytest.raises(PreconditionFailed, match="already exists"):
        require_conditional_writes(store)
