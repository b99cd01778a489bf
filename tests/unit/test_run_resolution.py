"""A retry of a retrain takes its first attempt's resolution of a channel
(protein.data.run_resolution), whatever was pushed in between."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from protein.data.run_resolution import resolution_key, resolve_once
from protein.storage import LocalStore

RUN = str(uuid.UUID(int=7))


def push(sequence: int) -> dict[str, Any]:
    return {"uri": f"/store/datasets/{sequence:016x}/", "fingerprint": f"{sequence:016x}", "channel": "latest",
            "sequence": sequence, "event_id": f"event-{sequence}", "passed_over": [], "trigger_sequence": None}


def test_a_retry_after_a_push_takes_the_first_attempts_push(tmp_path: Path):
    first, kept = resolve_once("channel:latest", str(tmp_path), RUN, lambda: push(1))
    assert (first, kept) == (push(1), False)
    again, kept = resolve_once("channel:latest", str(tmp_path), RUN, lambda: push(2))  # push #2 came meanwhile
    assert (again, kept) == (push(1), True)
    # Another run resolves the channel's head.
    assert resolve_once("channel:latest", str(tmp_path), str(uuid.UUID(int=8)), lambda: push(2)) == (push(2), False)


def test_a_problem_or_a_dataset_named_directly_is_not_kept(tmp_path: Path):
    assert resolve_once("channel:latest", str(tmp_path), RUN, lambda: {"problem": "no push yet"}) == (
        {"problem": "no push yet"}, False)
    assert resolve_once("channel:latest", str(tmp_path), RUN, lambda: push(3)) == (push(3), False)  # mended: resolved
    direct = {"uri": "/data/x", "fingerprint": None, "channel": None, "sequence": None}
    assert resolve_once("/data/x", str(tmp_path), str(uuid.UUID(int=9)), lambda: direct) == (direct, False)
    assert not LocalStore(tmp_path).list(f"gates/retrains/{uuid.UUID(int=9)}/")


def test_a_rerun_with_other_data_resolves_afresh(tmp_path: Path):
    resolve_once("channel:latest", str(tmp_path), RUN, lambda: push(1))
    assert resolve_once("channel:other", str(tmp_path), RUN, lambda: push(5)) == (push(5), False)


def test_an_attempt_beside_this_one_that_kept_first_wins(tmp_path: Path):
    store = LocalStore(tmp_path)

    def resolve_while_the_other_keeps_push_1() -> dict[str, Any]:
        doc = {"format": "protein-run-resolution/1", "data": "channel:latest", "resolved": push(1), "at": "t"}
        store.put_bytes(resolution_key(RUN), json.dumps(doc).encode(), if_none_match=True)
        return push(2)

    assert resolve_once("channel:latest", str(tmp_path), RUN, resolve_while_the_other_keeps_push_1) == (push(1), True)


@pytest.mark.parametrize("bad", ["None", "", "../x", "run-1"])
def test_the_key_is_built_only_from_a_flow_run_id(bad: str):
    with pytest.raises(ValueError, match="keyed by its flow run id"):
        resolution_key(bad)
    assert resolution_key(RUN.upper()) == f"gates/retrains/{RUN}/resolved.json"
