from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.helpers import module_scratch, run_scratch

if TYPE_CHECKING:
    from deployments.ha_stack import HAPrefect, Postgres
    from tests.conftest import MotoServer
    from tests.integration.dead_run import DeadRun
    from tests.integration.gpu_cluster import Cluster
    from tests.integration.prefect_services import Service
    from tests.integration.prefect_stack import Stack


@pytest.fixture(scope="session")
def prefect_harness(request: pytest.FixtureRequest) -> Iterator[None]:
    """One temporary Prefect API for the session's modules that use it (it takes ~9 s to start),
    stopped once the last of them ends (tests/early_release.py)."""
    from prefect.testing.utilities import prefect_test_harness

    from tests.early_release import EarlyRelease

    with ExitStack() as resources:  # closing it twice runs its callbacks once
        resources.enter_context(prefect_test_harness(server_startup_timeout=60))
        EarlyRelease.of(request.config).hold("prefect_harness", resources.close)
        yield


@pytest.fixture
def services() -> Iterator[list[Service]]:
    """Server and worker processes a test starts; all stopped (and checked stopped) at its end."""
    from tests.integration.prefect_services import running_services

    with running_services() as started:
        yield started


@pytest.fixture(scope="session")
def ha_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session; each HA Prefect server gets a database of its own
    on it (a copy of one migrated template, so the migrations run once; the run's other clusters
    restore the template from its dump)."""
    from deployments.ha_stack import running_postgres

    with running_postgres(template_cache=run_scratch(tmp_path_factory, "prefect-template")) as pg:
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
def cluster(s3_server: MotoServer, ha_postgres: Postgres, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The multi-host cluster (tests/integration/gpu_cluster.py) of test_multihost.py and
    test_dispatch_faults.py, started once for both and stopped once the last of their tests ends
    (tests/early_release.py). Each test starts the GPU hosts it uses (Cluster.gpu_host replaces
    those before) and writes to a store prefix of its own."""
    from tests.early_release import EarlyRelease
    from tests.integration.gpu_cluster import running_cluster

    with ExitStack() as resources:  # closing it twice runs its callbacks once
        root = resources.enter_context(module_scratch(tmp_path_factory, "multihost"))
        cluster = resources.enter_context(running_cluster(s3_server.endpoint, ha_postgres, root))
        EarlyRelease.of(request.config).hold("cluster", resources.close)
        yield cluster


@pytest.fixture(scope="session")
def prefect_stack(ha_postgres: Postgres, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A real server + cpu worker + deployments + automations, shared by the events, push-queue and
    UI tests (starting one takes most of a minute on a loaded machine), and stopped once the last of
    them ends (tests/early_release.py). Its S3 server is its own: tests between the events and the
    UI tests must not be able to empty the stack's bucket."""
    from tests.conftest import running_moto_server
    from tests.early_release import EarlyRelease
    from tests.integration import dead_run
    from tests.integration.prefect_stack import start_stack, stop_stack

    # Stopped after the last test that uses it (closing an ExitStack twice runs its callbacks once).
    with ExitStack() as resources:
        s3 = resources.enter_context(running_moto_server())
        stack = start_stack(tmp_path_factory.mktemp("stack"), s3, ha_postgres)
        resources.callback(stop_stack, stack)
        if any(dead_run.FIXTURE in getattr(item, "fixturenames", ()) for item in request.session.items):
            # Made now, its zombie window passes while the stack's other tests run (dead_run.py).
            stack.dead_run = resources.enter_context(
                dead_run.dead_run_in_background(stack, tmp_path_factory.mktemp("zombie")))
        EarlyRelease.of(request.config).hold("prefect_stack", resources.close)
        yield stack


@pytest.fixture(scope="session")
def dead_run(prefect_stack: Stack) -> DeadRun:
    """The stack's run whose machine died, made in the background since the stack came up."""
    assert prefect_stack.dead_run is not None, "prefect_stack starts it when a selected test uses dead_run"
    return prefect_stack.dead_run


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 labelled 32 px images and 3 test images, one copy per module that uses them."""
    from tests.helpers import write_dataset
    from tests.integration.reliability_common import IMAGE, labels

    return write_dataset(tmp_path_factory.mktemp("small") / "ds", labels(24), ["900", "901", "902"], size=IMAGE)


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Flows and library calls without an explicit cache dir use this one, not the per-user cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(cache))
    return cache
