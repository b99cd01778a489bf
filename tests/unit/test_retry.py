from __future__ import annotations

import pytest
from prefect.states import Failed

from protein.errors import (
    DataError,
    IntegrityError,
    NotFound,
    PreconditionFailed,
    PromotionConflict,
    RegistryError,
    StoreError,
    ValidationFailed,
)
from tasks.retry import retry_transient


@pytest.mark.parametrize("error", [DataError("bad row"), ValidationFailed("drift"), RegistryError("unknown"),
                                   PromotionConflict("lost"), NotFound("gone"), PreconditionFailed("exists"),
                                   IntegrityError("checksum")])
def test_decisions_and_bad_input_are_not_retried(error: Exception) -> None:
    assert retry_transient(None, None, Failed(data=error)) is False


@pytest.mark.parametrize("error", [StoreError("endpoint unreachable"), ConnectionError("reset"),
                                   RuntimeError("unexpected")])
def test_faults_on_the_way_are_retried(error: Exception) -> None:
    assert retry_transient(None, None, Failed(data=error)) is True
