from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING

import pytest

from tests.helpers import module_scratch

if TYPE_CHECKING:
    from deployments.ha_stack import HAPrefect, Postgres
    from tests.integration.prefect_services import Service
    from tests.integration.prefect_stack import Stack


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API for the whole session (it takes ~9 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Server and worker processes a test starts; all stopped (and checked stopped) at its end."""
    from tests.integration.prefect_services import running_services

    with running_services() as started:
        yield started


@pytest.fixture(scope="session")
def ha_postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session; each HA Prefect server gets a database of its own
    on it (a copy of one migrated template, so the migrations run once)."""
    from deployments.ha_stack import running_postgres

    with running_postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def ha_prefect(ha_postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HAPrefect]:
    """A highly available Prefect server (two APIs behind nginx, the services process, Redis) for
    one test module: modules deploy the same pools and deployments, so each has its own."""
    from deployments.ha_stack import start_ha_prefect, stop_ha_prefect
    from tests.integration.prefect_services import prefect_env

    with module_scratch(tmp_path_factory, "ha") as root:
        stack = start_ha_prefect(root, ha_postgres, prefect_env(root / "server-home"))
        try:
            yield stack
        finally:
            stop_ha_prefect(stack)


@pytest.fixture(scope="session")
def prefect_stack(ha_postgres: Postgres, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A real server + cpu worker + deployments + automations, shared by the events, push-queue and
    UI tests (starting one takes most of a minute on a loaded machine), and stopped once the last of
    them ends (tests/early_release.py). Its S3 server is its own: tests between the events and the
    UI tests must not be able to empty the stack's bucket."""
    from tests.conftest import SHARED_STACK_FIXTURE, running_moto_server
    from tests.early_release import EarlyRelease
    from tests.integration.prefect_stack import start_stack, stop_stack

    # Stopped after the last test that uses it (closing an ExitStack twice runs its callbacks once).
    with ExitStack() as resources:
        s3 = resources.enter_context(running_moto_server())
        stack = start_stack(tmp_path_factory.mktemp("stack"), s3, ha_postgres)
        resources.callback(stop_stack, stack)
        EarlyRelease.of(request.config).hold(SHARED_STACK_FIXTURE, resources.close)
        yield stack
