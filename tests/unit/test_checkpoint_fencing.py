"""One line of training per run: a second attempt of the same run (a host the dispatcher gave up
on, still alive) never interleaves its checkpoints with the attempt that took over
(protein/modeling/checkpoints.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from protein.config import TrainConfig
from protein.errors import CheckpointSuperseded, PreconditionFailed
from protein.labels import LABELS
from protein.modeling.checkpoints import (
    checkpoint_key,
    load_checkpoint,
    metrics_key,
    read_checkpoint,
    save_checkpoint,
)
from protein.modeling.train import fit
from protein.storage import Store, open_store
from tests.helpers import TINY_ARCH

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 255, (24, 32, 32, 3), dtype=np.uint8)
TARGETS = (RNG.random((24, len(LABELS))) > 0.7).astype(np.float32)
TRAIN, HOLDOUT = np.arange(18), np.arange(18, 24)


def config(epochs: int) -> TrainConfig:
    return TrainConfig(arch=TINY_ARCH, image_size=32, epochs=epochs, batch_size=8, device="cpu")


def train(store: Store, run_id: str, epochs: int, **hooks: Any) -> Any:
    return fit(config(epochs), IMAGES, TARGETS, TRAIN, HOLDOUT, store, run_id, **hooks)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_bucket"))


def test_an_attempt_that_goes_on_after_another_took_over_stops_at_its_next_write(store: Store) -> None:
    """Attempt A writes epoch 1; attempt B (the re-dispatch) resumes from it and finishes; A, alive
    all along, then finishes its epoch 2 and is stopped before writing it. The store keeps B's line."""
    finished: list[Any] = []

    def take_over(record: dict[str, Any]) -> None:
        if record["epoch"] == 1:
            finished.append(train(store, "r", 3))

    with pytest.raises(CheckpointSuperseded, match=r"runs/r/checkpoint\.pt: another attempt of run r wrote the "
                                                  r"checkpoint after this attempt last wrote it; this attempt stops"):
        train(store, "r", 3, on_epoch=take_over)
    [second] = finished
    assert second.resumed_from_epoch == 1
    kept = load_checkpoint(store, "r")
    assert kept is not None and kept["epoch"] == 3
    assert [json.loads(h) for h in kept["history"]] == second.history


def test_an_attempt_that_started_from_nothing_loses_to_one_that_wrote_first(store: Store) -> None:
    taken: list[Any] = []

    def take_over(batch: int) -> None:
        if not taken:
            taken.append(train(store, "r", 1))

    with pytest.raises(CheckpointSuperseded, match=r"after this attempt started"):
        train(store, "r", 1, on_batch=take_over)
    kept = load_checkpoint(store, "r")
    assert kept is not None and [json.loads(h) for h in kept["history"]] == taken[0].history


def test_a_run_resumed_by_its_own_retry_writes_on(store: Store) -> None:
    """The fence reads the etag afresh on every start: a retry after a kill is not fenced out."""
    first = train(store, "r", 1)
    state, etag = read_checkpoint(store, "r")
    assert state is not None and etag == store.etag(checkpoint_key("r"))
    again = train(store, "r", 1)
    assert again.resumed_from_epoch == 1 and again.history == first.history


class AnswerLost:
    """A store whose conditional write is taken and then answered with 412, as a client that
    retries a request whose first answer was lost sees it."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def put_bytes(self, key: str, data: bytes, **conditions: Any) -> str:
        self.store.put_bytes(key, data, **conditions)
        raise PreconditionFailed(f"{key}: changed since its etag was read")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_write_whose_answer_was_lost_is_not_mistaken_for_another_attempts(store: Store) -> None:
    state = {"format": "protein-train-checkpoint/1", "epoch": 1, "history": []}
    first = save_checkpoint(store, "r", state)
    etag = save_checkpoint(AnswerLost(store), "r", {**state, "epoch": 2}, expected_etag=first)  # type: ignore[arg-type]
    assert etag == store.etag(checkpoint_key("r")) != first
    assert load_checkpoint(store, "r")["epoch"] == 2  # type: ignore[index]

    # Someone else's bytes behind the 412: a loss.
    store.put_bytes(checkpoint_key("r"), b"another attempt's checkpoint")
    with pytest.raises(CheckpointSuperseded):
        save_checkpoint(store, "r", {**state, "epoch": 3}, expected_etag=etag)
    assert store.get_bytes(checkpoint_key("r")) == b"another attempt's checkpoint"


class WrittenBetween:
    """Like AnswerLost, and another attempt writes right after this one's checksum is read: its
    etag must not be taken for this attempt's own."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.armed = False

    def put_bytes(self, key: str, data: bytes, **conditions: Any) -> str:
        self.store.put_bytes(key, data, **conditions)
        self.armed = True
        raise PreconditionFailed(f"{key}: changed since its etag was read")

    def recorded_sha256(self, key: str) -> Any:
        recorded = self.store.recorded_sha256(key)
        if self.armed:
            self.armed = False
            self.store.put_bytes(key, b"the other attempt's next epoch")
        return recorded

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_another_write_between_the_checks_is_not_taken_for_this_attempts_own(store: Store) -> None:
    state = {"format": "protein-train-checkpoint/1", "epoch": 1, "history": []}
    first = save_checkpoint(store, "r", state)
    with pytest.raises(CheckpointSuperseded):
        save_checkpoint(WrittenBetween(store), "r", {**state, "epoch": 2}, expected_etag=first)  # type: ignore[arg-type]
    assert store.get_bytes(checkpoint_key("r")) == b"the other attempt's next epoch"


class WrittenAfterTheBytes:
    """Another attempt writes its checkpoint right after this one has read the checkpoint's bytes:
    between the two reads if the bytes were read before the etag."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.raced = False

    def get_bytes(self, key: str, **kwargs: Any) -> bytes:
        read = self.store.get_bytes(key, **kwargs)
        if key == checkpoint_key("r") and not self.raced:
            self.raced = True
            self.store.put_bytes(key, b"the other attempt's next epoch")
        return read

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_checkpoint_written_between_the_reads_is_never_overwritten(store: Store) -> None:
    """The etag is read before the bytes: read after them, it would be the other attempt's, and this
    attempt's next write would replace a checkpoint it never saw."""
    state = {"format": "protein-train-checkpoint/1", "epoch": 1, "history": []}
    save_checkpoint(store, "r", state)
    racing = WrittenAfterTheBytes(store)
    read, etag = read_checkpoint(racing, "r")  # type: ignore[arg-type]
    assert racing.raced and read is not None and read["epoch"] == 1
    with pytest.raises(CheckpointSuperseded):
        save_checkpoint(store, "r", {**state, "epoch": 2}, expected_etag=etag)
    assert store.get_bytes(checkpoint_key("r")) == b"the other attempt's next epoch"


def test_a_checkpoint_deleted_under_an_attempt_stops_it_and_says_so(store: Store) -> None:
    state = {"format": "protein-train-checkpoint/1", "epoch": 1, "history": []}
    first = save_checkpoint(store, "r", state)
    store.delete(checkpoint_key("r"))
    with pytest.raises(CheckpointSuperseded, match=r"runs/r/checkpoint\.pt: deleted after this attempt last wrote it"):
        save_checkpoint(store, "r", {**state, "epoch": 2}, expected_etag=first)


def test_an_attempt_that_lost_the_checkpoint_never_rewrites_the_metrics(store: Store) -> None:
    """The metrics history is written after the checkpoint: an attempt whose checkpoint another
    attempt has replaced meanwhile stops before it, leaving the winner's history."""
    calls: list[int] = []
    real = store.put_bytes

    def racing_put(key: str, data: bytes, **conditions: Any) -> str:
        etag = real(key, data, **conditions)
        if key == checkpoint_key("r"):
            calls.append(1)
            if len(calls) == 2:  # epoch 2 written; the other attempt replaces it before the metrics go
                real(key, b"the other attempt's checkpoint")
                real(metrics_key("r"), b"the other attempt's history")
        return etag

    store.put_bytes = racing_put  # type: ignore[method-assign]
    with pytest.raises(CheckpointSuperseded):
        train(store, "r", 3)
    assert store.get_bytes(metrics_key("r")) == b"the other attempt's history"
