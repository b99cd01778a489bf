"""A lock or marker write that landed but whose answer was lost: the client's retry meets the write
itself (412). It is recognised as this holder's by its id (protein.data.gc_coordination)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from protein.data.gc_coordination import GC_LOCK_KEY, PUSHES_PREFIX, CoordinationTimes, GcLock, PushMarker
from protein.errors import PreconditionFailed, StoreBusy
from protein.storage import LocalStore

TIMES = CoordinationTimes(poll_s=0.01, push_wait_s=0.05)


class AnswerLost:
    """A store whose conditional writes land, then answer 412: the retry of a write whose first
    answer never arrived."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.lost: list[str] = []

    def put_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        self.store.put_bytes(key, data, **kwargs)
        if kwargs.get("if_none_match") or kwargs.get("if_match"):
            self.lost.append(key)
            raise PreconditionFailed(f"{key}: already exists")
        return self.store.etag(key) or ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_gc_lock_whose_answer_was_lost_is_held_and_released(tmp_path: Path) -> None:
    store = AnswerLost(LocalStore(tmp_path))
    lock = GcLock.acquire(store, TIMES)  # it said "another datasets gc holds it (host <itself> pid <itself>)"
    assert store.lost == [GC_LOCK_KEY]
    lock.check_held()
    lock.release()
    assert not store.exists(GC_LOCK_KEY)


def test_a_push_marker_whose_answer_was_lost_is_the_pushs_and_removed(tmp_path: Path) -> None:
    store = AnswerLost(LocalStore(tmp_path))
    with PushMarker(store, TIMES):  # it failed the push "already exists", and left the marker for a day
        assert len(store.list(PUSHES_PREFIX)) == 1
    assert store.lost and store.list(PUSHES_PREFIX) == []


def test_a_lock_another_gc_holds_is_still_refused(tmp_path: Path) -> None:
    local = LocalStore(tmp_path)
    held = GcLock.acquire(local, TIMES)
    with pytest.raises(StoreBusy, match="another datasets gc holds"):
        GcLock.acquire(local, TIMES)
    held.release()
