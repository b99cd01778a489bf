"""The two tiers and how `make test` hands them to its workers.

The fast tier is what is left when every test that uses one of SLOW_FIXTURES is marked slow (a
collection hook, so the marker cannot drift from what a test does); the session fixtures several
modules share run as one unit of work each on one xdist worker (SHARED_FIXTURE_MODULES,
`shared_fixture_scheduler`), the slow modules first, a test marked last_in_unit after the rest of
its unit; a slow session refuses to start on a disk too small for it. tests/conftest.py calls these
from its hooks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from tests import idle_worker

# The fast tier (`make check`, `pytest -m "not slow"`) is what is left when every test that requests one
# of these fixtures, directly or through another fixture, is marked slow by pytest_collection_modifyitems.
# A test that starts a server, a cluster, a training of whole epochs or the real entry point in a fresh
# interpreter gets there through one of these, so the marker cannot drift from what the test does.
SLOW_FIXTURES: dict[str, str] = {
    "prefect_harness": "starts a Prefect server for the session",
    "prefect_stack": "starts a Prefect server, a worker, deployments and automations",
    "services": "starts Prefect server and worker processes",
    "cluster": "starts a multi-host Prefect cluster deployed from a git clone",
    "ha_postgres": "starts a PostgreSQL cluster for highly available Prefect servers",
    "failover": "starts a highly available Prefect stack on its own PostgreSQL, with a GPU-host worker",
    "protein_process": "runs the real entry point, or a module or script of the project, in a fresh interpreter "
                       "(imports torch and Prefect: seconds a call)",
    "trainer": "trains models for whole epochs",
}


# Session fixtures several modules share, each with the modules whose tests use it. A session
# fixture lives once per xdist worker: handed to both, it started twice (the stack: two APIs,
# services, nginx, Redis, a deploy, a worker, ~25 s of CPU; the harness: a server migrating a new
# SQLite database, ~9.5 CPU-s; the multi-host cluster: a highly available server, a deploy, a worker,
# ~30 CPU-s) and then idled on both until the session's end (the stack ~6 % of a
# core, the harness 0.9 CPU-s a minute). `make test` hands each list to one worker as one unit of
# work (SharedFixtureScheduling), and tests/early_release.py stops the fixture after that unit's last
# test; collection fails on a module that uses one of them and is not listed, so the lists cannot
# fall behind the tests.
SHARED_FIXTURE_MODULES: dict[str, frozenset[str]] = {
    "prefect_stack": frozenset({
        "tests/integration/test_events.py",
        "tests/integration/test_push_queue.py",
        "tests/integration/test_ui_browser.py",
    }),
    "prefect_harness": frozenset({
        "tests/integration/test_channel_flows.py",
        "tests/integration/test_deploy_check.py",
        "tests/integration/test_deployment_check.py",
        "tests/integration/test_flows.py",
        "tests/integration/test_job_templates.py",
        "tests/integration/test_kaggle_layout.py",
        "tests/integration/test_racing_retrains.py",
        "tests/integration/test_resume_after_kill.py",
        "tests/integration/test_secret_leaks.py",
        "tests/integration/test_storage_faults.py",
    }),
    "cluster": frozenset({
        "tests/integration/test_dispatch_faults.py",
        "tests/integration/test_multihost.py",
    }),
}


def shared_unit(fixture: str) -> str:
    return f"the modules that share the session's {fixture}"


def shared_units() -> dict[str, str]:
    """Each module that uses a shared session fixture -> the unit of work of that fixture's modules."""
    return {module: shared_unit(fixture) for fixture, modules in SHARED_FIXTURE_MODULES.items() for module in modules}


def module_of(item: pytest.Item, root: Path) -> str:
    """The test's module as SHARED_FIXTURE_MODULES names it (relative to the root, / separated)."""
    return item.path.relative_to(root).as_posix() if item.path.is_relative_to(root) else str(item.path)


def work_unit(item: pytest.Item, root: Path, unit_of: dict[str, str]) -> str:
    """The unit of work make test hands out whole that the test belongs to: its shared fixture's
    modules (unit_of, shared_units()) or, when it shares none, its own module."""
    module = module_of(item, root)
    return unit_of.get(module, module)


def unlisted_shared_fixture_modules(items: list[pytest.Item], root: Path) -> list[str]:
    """'module uses fixture' for each module that uses a shared fixture without being in its list,
    or that is in the lists of two (it cannot be in two units of work)."""
    problems = []
    for fixture, listed in SHARED_FIXTURE_MODULES.items():
        users = {module_of(item, root) for item in items if fixture in getattr(item, "fixturenames", ())}
        problems += [f"{module} uses {fixture}" for module in sorted(users - listed)]
    units = list(SHARED_FIXTURE_MODULES.values())
    problems += [f"{module} is listed for two shared fixtures" for i, a in enumerate(units) for b in units[i + 1:]
                 for module in sorted(a & b)]
    return problems


def shared_fixture_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadscope` (make test) with each shared fixture's modules as one unit; other modes as xdist has them."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling
    from xdist.workermanage import parse_tx_spec_config

    unit_of = shared_units()

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            """A shared fixture's modules together; any other test in loadscope's unit (its module or class)."""
            return unit_of.get(nodeid.split("::", 1)[0]) or super()._split_scope(nodeid)

    # tests/conftest.py announced an idle-time worker when the option applies (idle_worker.enabled).
    done_flag = idle_worker.announced_flag(config)
    if done_flag is None:
        return SharedFixtureScheduling(config, log)

    filler_id = idle_worker.idle_worker_id(len(parse_tx_spec_config(config)))

    class IdleTimeScheduling(SharedFixtureScheduling):
        """The last worker (tests/idle_worker.py) collected only the fast tier: it is handed the first
        queued unit of work all of whose tests it collected, and is shut down when none is left; the
        others take the queue in order. Once no slow test is left, the flag file tells the idle-time
        worker to stop waiting for spare cores."""

        fast: set[str] | None = None

        def add_node_collection(self, node: Any, collection: Sequence[str]) -> None:
            super().add_node_collection(node, collection)
            if node.gateway.id == filler_id and node in self.registered_collections:
                self.fast = set(collection)
            # The others' collection is the session's (LoadScopeScheduling takes the first one's).
            self.registered_collections = dict(sorted(self.registered_collections.items(),
                                                      key=lambda entry: entry[0].gateway.id == filler_id))

        def _check_nodes_have_same_collection(self) -> bool:
            others = {node: c for node, c in self.registered_collections.items() if node.gateway.id != filler_id}
            filler = [c for node, c in self.registered_collections.items() if node.gateway.id == filler_id]
            full = set(next(iter(others.values()), []))
            if filler and not set(filler[0]) <= full:
                # As xdist reports collections that differ: a collection error, so the run fails.
                message = f"{filler_id} collected tests the others did not: {sorted(set(filler[0]) - full)[:5]}"
                self.log(message)
                self.config.hook.pytest_collectreport(report=pytest.CollectReport(
                    nodeid=filler_id, outcome="failed", longrepr=message, result=[]))
                return False
            saved, self.registered_collections = self.registered_collections, others
            try:
                return bool(super()._check_nodes_have_same_collection())
            finally:
                self.registered_collections = saved

        def _assign_work_unit(self, node: Any) -> None:
            if node.gateway.id == filler_id:
                fast = self.fast or set()
                scope = next((s for s, unit in self.workqueue.items() if idle_worker.fast_unit(unit, fast)), None)
                if scope is None:
                    node.shutdown()
                    return
                self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

        def _reschedule(self, node: Any) -> None:
            if (node.gateway.id == filler_id and self.workqueue and not node.shutting_down
                    and not any(idle_worker.fast_unit(unit, self.fast or set()) for unit in self.workqueue.values())):
                node.shutdown()  # it finishes what it was handed
                return
            super()._reschedule(node)

        def schedule(self) -> None:
            super().schedule()
            # xdist counts the session's tests from the last worker to finish collecting: the
            # progress would pass 100 % when that was the idle-time worker.
            session = getattr(self.config.pluginmanager.get_plugin("dsession"), "_session", None)
            if session is not None and self.collection:
                session.testscollected = len(self.collection)

        def mark_test_complete(self, node: Any, item_index: int, duration: float = 0) -> None:
            super().mark_test_complete(node, item_index, duration)
            if self.fast is not None and not done_flag.exists() and not idle_worker.slow_tests_left(
                    self.workqueue.values(), [u for units in self.assigned_work.values() for u in units.values()],
                    self.fast):
                done_flag.touch()

    return IdleTimeScheduling(config, log)


def mark_slow_and_order(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slow marker from the fixtures each test uses, then the order make test's workers run them in."""
    if problems := unlisted_shared_fixture_modules(items, config.rootpath):
        raise pytest.UsageError(f"{'; '.join(problems)}: each module that uses a shared session fixture is listed "
                                "once in SHARED_FIXTURE_MODULES (tests/tiers.py), so that make test starts it once")
    for item in items:
        used = sorted(set(getattr(item, "fixturenames", ())) & SLOW_FIXTURES.keys())
        if used:
            item.add_marker(pytest.mark.slow(reason=", ".join(f"{name}: {SLOW_FIXTURES[name]}" for name in used)))
    if is_xdist_worker(config):
        items[:] = slow_modules_first(items, load_durations(), config.rootpath)
    items[:] = last_in_unit_last(items, config.rootpath)


def last_in_unit_last(items: list[pytest.Item], root: Path) -> list[pytest.Item]:
    """Each test marked last_in_unit after every other test of its unit (the modules that share its
    session fixture, SHARED_FIXTURE_MODULES; its own module when it shares none), everything else in
    the order it had. Such a test waits for what that fixture started in the background (the stack's
    dead run, tests/integration/dead_run.py), and the wait passes while the others run; in any order
    the test is right, only slower."""
    unit_of = shared_units()

    def unit(item: pytest.Item) -> str:
        return work_unit(item, root, unit_of)

    ordered = [item for item in items if not item.get_closest_marker("last_in_unit")]
    for item in items:
        if item.get_closest_marker("last_in_unit"):
            same_unit = [index for index, other in enumerate(ordered) if unit(other) == unit(item)]
            ordered.insert(same_unit[-1] + 1 if same_unit else min(items.index(item), len(ordered)), item)
    return ordered


def is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


# What each module took in `make test` (its tests' setup, call and teardown, as the controller saw
# them), refreshed by `make durations` after a module is added or reshaped. make test hands the
# longest units of work out first by it (slow_modules_first), so that the two workers end together.
DURATIONS_FILE = Path(__file__).with_name("durations.json")
DURATIONS_OPTION = "--record-durations"


def load_durations(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """Seconds per module from the table; empty when it is missing or unreadable (then the order is
    the shuffle's, as before the table existed: slower to finish, never wrong)."""
    try:
        table = json.loads(path.read_text())
        return {str(module): float(seconds) for module, seconds in table["seconds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def slow_modules_first(items: list[pytest.Item], seconds: dict[str, float], root: Path) -> list[pytest.Item]:
    """The modules marked long_running (the soak), then the units of work with a slow test, then the
    others; within each group the longest unit first by the table (a shared fixture's modules are
    one unit, its time their sum), a unit the table does not know first of its group (its time is
    unknown: starting it early cannot leave it running alone at the end), ties in the order they
    had (pytest-randomly's shuffle runs before this hook, and still orders the tests inside a
    unit). `make test` hands units to its two xdist workers in this order (`--dist loadscope
    --no-loadscope-reorder`): the long ones, which mostly wait on servers, start first and the
    short CPU-bound ones fill in at the end, the longest of those first, so the two workers end
    together. In the shuffle's order instead, a session that drew the three-minute cluster unit
    last ran it alone at the end (14 min 43 s against 13 min 10-18 s; docs/testing.md)."""
    unit_of = shared_units()

    def unit(item: pytest.Item) -> str:
        return work_unit(item, root, unit_of)

    modules_of: dict[str, set[str]] = {}
    for item in items:
        modules_of.setdefault(unit(item), set()).add(module_of(item, root))
    cost = {name: sum(seconds.get(module, math.inf) for module in modules) for name, modules in modules_of.items()}
    slow_units = {unit(item) for item in items if item.get_closest_marker("slow")}
    long_units = {unit(item) for item in items if item.get_closest_marker("long_running")}
    return sorted(items, key=lambda item: (unit(item) not in long_units, unit(item) not in slow_units,
                                           -cost[unit(item)]))


class DurationRecorder:
    """`--record-durations PATH` (make durations): on the controller, each module's seconds (its
    tests' setup, call and teardown) summed from the reports, written to PATH when the session
    passed, so a failed or interrupted run never leaves a table with modules missing."""

    NAME = "protein-duration-recorder"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        module = report.nodeid.split("::", 1)[0]
        self.seconds[module] = self.seconds.get(module, 0.0) + report.duration

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if exitstatus != pytest.ExitCode.OK or not self.seconds:
            return
        table = {"measured_by": "make durations (make test's workers, this machine)",
                 "seconds": {module: round(s, 1) for module, s in sorted(self.seconds.items())}}
        self.path.write_text(json.dumps(table, indent=1) + "\n")


# The slow tier's peak on the temp disk, measured by .ci/run on three fresh clones (2026-12-04):
# 4.8-5.5 GB above where it started (servers, clusters and their clones, trained models), nearly all
# of it gone when pytest ends. With less free, tests fail by the hundred on "No space left on
# device" midway (a CI run did); one line before anything runs says why instead.
SLOW_TIER_FREE_GB = 7.0
DISK_REFUSED_EXIT = 4  # pytest's own code for a session that cannot start as asked


def disk_refusal(folder: str, free_bytes: int, need_gb: float) -> str | None:
    """Why a session cannot start on this disk, or None when it can."""
    if free_bytes >= need_gb * 1024**3:
        return None
    return (f"{folder} has {free_bytes / 1024**3:.1f} GB free; the slow tier needs about {need_gb:g} GB there "
            f"(its peak is about 5 GB): free some space, point TMPDIR at a larger disk, or run the fast tier "
            f"(make check); PROTEIN_TEST_MIN_FREE_GB overrides the figure")


def refuse_a_disk_too_small_for_the_slow_tier(folder: str) -> None:
    need = float(os.environ.get("PROTEIN_TEST_MIN_FREE_GB", SLOW_TIER_FREE_GB))
    refusal = disk_refusal(folder, shutil.disk_usage(folder).free, need)
    if refusal:
        pytest.exit(refusal, returncode=DISK_REFUSED_EXIT)
