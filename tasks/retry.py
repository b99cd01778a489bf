"""When a failed task is worth another try.

Prefect retries a task on any exception. Most of the pipeline's own errors are decisions or
bad input that a second try repeats word for word, 25 s later: a missing dataset, a row that
fails validation, an unknown model version, a lost compare-and-swap, bytes that fail their
checksum. A GPU out of memory is one too: the retry runs the same config (a resume refuses
another) and runs out again, twice, after the wait. Only faults of the path to the store (and
anything unexpected) are retried.
"""

from __future__ import annotations

from typing import Any

from prefect.states import State

from protein.errors import IntegrityError, NotFound, PreconditionFailed, ProteinError, StoreError

# Store errors that a retry repeats: the object is missing, lost a conditional write, or is corrupt.
PERMANENT_STORE_ERRORS = (NotFound, PreconditionFailed, IntegrityError)

# What to change, added to the OOM error the user sees: the retry cannot change the config.
OUT_OF_MEMORY_ADVICE = (
    "Not retried: the same config runs out of memory again. Start a new run with a smaller "
    "--batch-size (the flow's train.batch_size), or keep the batch and split it with --accumulate K "
    "(train.accumulate): each forward pass then holds batch/K images (docs/distributed.md).")


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA's, as torch.cuda.OutOfMemoryError), found by name so that
    modules importing this one do not load torch (tasks/training.py imports it in the task body)."""
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.partition(".")[0] == "torch"
               for cls in type(error).__mro__)


def is_transient(error: BaseException | None) -> bool:
    if error is not None and is_out_of_memory(error):
        return False
    if isinstance(error, StoreError):
        return not isinstance(error, PERMANENT_STORE_ERRORS)
    return not isinstance(error, ProteinError)


def failure_of(state: State) -> BaseException | None:
    error = state.result(raise_on_failure=False)
    return error if isinstance(error, BaseException) else None


def retry_transient(task: Any, task_run: Any, state: State) -> bool:
    """A Prefect `retry_condition_fn`: retry only errors that may pass on a second try."""
    return is_transient(failure_of(state))


def retry_training(task: Any, task_run: Any, state: State) -> bool:
    """`retry_transient` for the task that trains, where an out of memory error also gets a note
    saying what to change, shown with its traceback (an evaluation scores at a fixed batch size:
    the advice is about training's options)."""
    error = failure_of(state)
    if error is not None and is_out_of_memory(error) and OUT_OF_MEMORY_ADVICE not in getattr(error, "__notes__", []):
        error.add_note(OUT_OF_MEMORY_ADVICE)
    return is_transient(error)
