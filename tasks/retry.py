"""When a failed task is worth another try.

Prefect retries a task on any exception. Most of the pipeline's own errors are decisions or
bad input that a second try repeats word for word, 25 s later: a missing dataset, a row that
fails validation, an unknown model version, a lost compare-and-swap, bytes that fail their
checksum. A GPU out of memory is one too: the retry runs the same config (a resume refuses
another) and runs out again, twice, after the wait (training raises it as `OutOfMemory`, whose
message says what to change; scoring's torch error is refused here by name). Only faults of the
path to the store (and anything unexpected) are retried, and a training process that died
(`TrainingFailed`: a rank of a multi-GPU run killed by the host's OOM killer or a GPU fault, exit 7,
"rerun to resume"): the retry resumes from the last checkpoint, as a lost single-process run's
re-dispatch does; before, the same kill lost the night when it struck a run with more than one rank.
"""

from __future__ import annotations

from typing import Any

from prefect.states import State

from protein.errors import (
    IntegrityError,
    NotFound,
    PreconditionFailed,
    ProteinError,
    StoreError,
    TrainingFailed,
    is_out_of_memory,
)

# Store errors that a retry repeats: the object is missing, lost a conditional write, or is corrupt.
PERMANENT_STORE_ERRORS = (NotFound, PreconditionFailed, IntegrityError)


def is_transient(error: BaseException | None) -> bool:
    if error is not None and is_out_of_memory(error):
        return False
    if isinstance(error, StoreError):
        return not isinstance(error, PERMANENT_STORE_ERRORS)
    if isinstance(error, TrainingFailed):
        return True
    return not isinstance(error, ProteinError)


def failure_of(state: State) -> BaseException | None:
    error = state.result(raise_on_failure=False)
    return error if isinstance(error, BaseException) else None


def retry_transient(task: Any, task_run: Any, state: State) -> bool:
    """A Prefect `retry_condition_fn`: retry only errors that may pass on a second try."""
    return is_transient(failure_of(state))
