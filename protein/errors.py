"""Errors the pipeline raises on purpose; each carries the exit code the CLI returns."""

from __future__ import annotations


class ProteinError(Exception):
    """Base class: a clear, one-line, user-facing failure (no traceback needed)."""

    exit_code = 2


class DataError(ProteinError):
    """The dataset is missing, malformed, or an input file is unreadable."""

    exit_code = 2


class FingerprintMismatch(DataError):
    """The data opened is not the data that was validated (its fingerprint differs)."""


class ValidationFailed(ProteinError):
    """The dataset was read but failed validation; the report says why."""

    exit_code = 1


class StoreError(ProteinError):
    """The object store is unreachable, refuses access, or returned a bad object."""

    exit_code = 3


class IntegrityError(StoreError):
    """An object's bytes do not match the checksum recorded when it was written."""


class RegistryError(ProteinError):
    """A model version is unknown or inconsistent."""

    exit_code = 4


class PromotionConflict(RegistryError):
    """The champion moved since the caller read it: compare-and-swap lost."""

    exit_code = 5


class NotFound(StoreError):
    """The requested object does not exist in the store."""


class PreconditionFailed(StoreError):
    """A conditional write lost: the object exists, or changed since its etag was read."""


class UnsupportedRequest(StoreError):
    """The S3 endpoint does not implement what the request asked of it (501 NotImplemented): a condition
    header, a checksum algorithm. The same request will be refused again."""


class StoreBusy(ProteinError):
    """Another process holds what this one needs for now (a datasets gc running while a push waits, or a
    second gc): nothing was changed; run it again when the other ends."""

    exit_code = 9


class RecordError(ProteinError):
    """A record the pipeline keeps in the store (model.json, champion.json, a run index, a manifest)
    is larger than its size cap, not JSON, or not the shape its schema says: read, never trusted."""

    exit_code = 8


class TrainingFailed(ProteinError):
    """A training process (one rank of a distributed run) died; the run can be resumed."""

    exit_code = 7


class RankZeroError(ProteinError):
    """The error a rank of a `train --nproc` run stopped on (rank 0's, else the lowest rank's that
    wrote one), with that error's own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OutOfMemory(ProteinError):
    """Training ran out of memory (torch's `OutOfMemoryError`). A retry runs the same config (a
    resume refuses another one) and runs out again, so it is a decision for a person: the message
    says what to change."""

    exit_code = 11


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA's, as torch.cuda.OutOfMemoryError), found by name so that
    this module and those importing it do not load torch."""
    return any(cls.__name__ == "OutOfMemoryError" and cls.__module__.partition(".")[0] == "torch"
               for cls in type(error).__mro__)


class CheckpointSuperseded(ProteinError):
    """Another attempt of the same training run wrote its checkpoint after this attempt read or
    wrote it (protein/modeling/checkpoints.py): this attempt stops, the other carries the run."""

    exit_code = 10


class TrainingDiverged(ProteinError):
    """An epoch's training loss is not finite (NaN or inf): the weights are no longer numbers, and
    a retry of the same config diverges again. Nothing of that epoch is checkpointed or registered;
    the message names the learning rate to lower."""

    exit_code = 12


class EvidenceRefused(IntegrityError):
    """What a scoring host reported does not agree with what this host derives or computes
    itself (docs/security.md): the result is refused, never retried."""
