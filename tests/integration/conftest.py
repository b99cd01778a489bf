from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.integration.prefect_stack import Stack


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for the whole session (it takes ~9 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def prefect_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A real server + cpu worker + deployments + automations, shared by the events and UI tests
    (starting one takes most of a minute on a loaded machine). Its S3 server is its own: tests
    between the events and the UI tests must not be able to empty the stack's bucket."""
    from tests.conftest import running_moto_server
    from tests.integration.prefect_stack import start_stack, stop_stack

    with running_moto_server() as s3:
        stack = start_stack(tmp_path_factory.mktemp("stack"), s3)
        try:
            yield stack
        finally:
            stop_stack(stack)
