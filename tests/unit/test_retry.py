from __future__ import annotations

import pytest
import torch
from prefect.states import Failed

from protein.errors import (
    DataError,
    IntegrityError,
    NotFound,
    OutOfMemory,
    PreconditionFailed,
    PromotionConflict,
    RegistryError,
    StoreError,
    ValidationFailed,
)
from tasks.retry import is_transient, retry_transient


@pytest.mark.parametrize("error", [DataError("bad row"), ValidationFailed("drift"), RegistryError("unknown"),
                                   PromotionConflict("lost"), NotFound("gone"), PreconditionFailed("exists"),
                                   IntegrityError("checksum")])
def test_decisions_and_bad_input_are_not_retried(error: Exception) -> None:
    assert retry_transient(None, None, Failed(data=error)) is False


@pytest.mark.parametrize("error", [StoreError("endpoint unreachable"), ConnectionError("reset"),
                                   RuntimeError("unexpected")])
def test_faults_on_the_way_are_retried(error: Exception) -> None:
    assert retry_transient(None, None, Failed(data=error)) is True


@pytest.mark.parametrize("error_class", [torch.OutOfMemoryError, torch.cuda.OutOfMemoryError],
                         ids=["torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"])
def test_gpu_out_of_memory_is_not_retried(error_class: type[Exception]) -> None:
    """A retry runs the same config (a resume refuses another one): it runs out of memory again.
    Training raises it as OutOfMemory, whose message says what to change (tests/unit/
    test_out_of_memory.py); scoring's torch error is refused by name."""
    from tasks.evaluation import evaluate_model
    from tasks.training import train_model

    error = error_class("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert is_transient(error) is False
    assert retry_transient(evaluate_model, None, Failed(data=error)) is False
    assert train_model.retry_condition_fn is retry_transient
    assert retry_transient(train_model, None, Failed(data=OutOfMemory("run r ran out of memory"))) is False


def test_other_runtime_errors_stay_transient() -> None:
    assert is_transient(RuntimeError("CUDA error: unspecified launch failure")) is True


def test_a_dead_training_process_is_retried_to_resume() -> None:
    # A rank of a multi-GPU run killed (host OOM killer, GPU fault): exit 7, "rerun to resume". The
    # train task's retry resumes from the last checkpoint; a single-process run killed the same way
    # is re-dispatched as lost, so without the retry the night was lost only with more ranks.
    from protein.errors import TrainingFailed
    from tasks.training import train_model

    assert is_transient(TrainingFailed("rank 1 exited with signal 9; rerun with run id r to resume")) is True
    assert retry_transient(train_model, None, Failed(data=TrainingFailed("rank 1 exited -9"))) is True
