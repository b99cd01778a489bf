"""The idle-time worker of `make test` (tests/idle_worker.py): what the scheduler hands it, when it
is told the slow tier is done, and how it decides a core is spare."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests import idle_worker
from tests.tiers import shared_fixture_scheduler
from tests.unit.test_tiers import Worker  # xdist's worker as the scheduler sees it

SLOW = ["tests/integration/test_a.py::test_slow_1", "tests/integration/test_a.py::test_slow_2",
        "tests/integration/test_b.py::test_slow"]
FAST = ["tests/unit/test_c.py::test_1", "tests/unit/test_c.py::test_2", "tests/unit/test_d.py::test_1",
        "tests/unit/test_e.py::test_1", "tests/unit/test_e.py::test_2", "tests/unit/test_f.py::test_1"]
# A module with slow and fast tests is one unit of work: the idle-time worker collects only its fast
# test, so the unit is not its to run.
MIXED = ["tests/model/test_g.py::test_fast", "tests/model/test_g.py::test_slow"]
SESSION = SLOW + MIXED + FAST  # slow modules first, as tests/tiers.py orders them


def scheduler(flag: Path, monkeypatch: pytest.MonkeyPatch, workers: int = 3, announced_by: str | None = "run-1") -> Any:
    """The controller's scheduler after tests/conftest.py announced an idle-time worker (as run
    ``announced_by``; None: it announced none) in a session whose run id is run-1."""
    if announced_by is None:
        monkeypatch.delenv(idle_worker.DONE_FLAG_ENV, raising=False)
    else:
        monkeypatch.setenv(idle_worker.DONE_FLAG_ENV, f"{announced_by} {flag}")
    options = {"dist": "loadscope", "fill_idle": True, "numprocesses": workers, "tx": [f"{workers}*popen"],
               "testrunuid": "run-1"}
    config = SimpleNamespace(getvalue=options.__getitem__,
                             getoption=lambda name, default=None: options.get(name, default),
                             option=SimpleNamespace(loadscopereorder=False),
                             pluginmanager=SimpleNamespace(get_plugin=lambda name: None))
    return shared_fixture_scheduler(config, None)  # type: ignore[arg-type]


def run_session(flag: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, list[str]], list[tuple[str, bool]]]:
    """Three workers, the idle-time one collecting first (its collection the fast tier), every test
    run to completion one at a time, the workers taking turns; returns the tests each ran and, for
    each completion, (the test, whether the flag existed right after it)."""
    sched = scheduler(flag, monkeypatch)
    nodes = [Worker("gw2"), Worker("gw0"), Worker("gw1")]
    collections = {"gw2": [n for n in SESSION if n in FAST or n.endswith("test_fast")], "gw0": SESSION, "gw1": SESSION}
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        sched.add_node_collection(node, collections[node.gateway.id])
    sched.schedule()
    ran: dict[str, list[str]] = {node.gateway.id: [] for node in nodes}
    completions: list[tuple[str, bool]] = []
    done = {node.gateway.id: 0 for node in nodes}
    while any(done[node.gateway.id] < len(node.sent) for node in nodes):
        for node in nodes:
            if done[node.gateway.id] < len(node.sent):
                index = node.sent[done[node.gateway.id]]
                done[node.gateway.id] += 1
                ran[node.gateway.id].append(collections[node.gateway.id][index])
                sched.mark_test_complete(node, index)
                completions.append((collections[node.gateway.id][index], flag.exists()))
    assert all(node.shutting_down for node in nodes), "every worker is told to stop once the work is out"
    return ran, completions


def test_the_idle_time_worker_gets_only_units_it_collected_whole_and_every_test_runs_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran, _ = run_session(tmp_path / "done", monkeypatch)
    assert ran["gw2"], "the idle-time worker ran nothing"
    assert set(ran["gw2"]) <= set(FAST), f"the idle-time worker ran {ran['gw2']}"
    everything = ran["gw0"] + ran["gw1"] + ran["gw2"]
    assert sorted(everything) == sorted(SESSION), "each test runs exactly once"
    assert set(SLOW + MIXED) <= set(ran["gw0"] + ran["gw1"])


def test_the_flag_is_written_once_the_last_slow_test_completed_and_not_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, completions = run_session(tmp_path / "done", monkeypatch)
    last_slow = max(i for i, (nodeid, _) in enumerate(completions) if nodeid not in FAST)
    assert [exists for _, exists in completions[:last_slow]] == [False] * last_slow
    assert all(exists for _, exists in completions[last_slow:])


def test_without_an_announcement_of_its_own_the_session_is_scheduled_as_before(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert type(scheduler(tmp_path / "done", monkeypatch, workers=2, announced_by=None)).__name__ \
        == "SharedFixtureScheduling"
    assert type(scheduler(tmp_path / "done", monkeypatch, workers=3)).__name__ == "IdleTimeScheduling"
    # An announcement this controller did not make (a session it runs inside of) is not its own.
    assert type(scheduler(tmp_path / "done", monkeypatch, workers=3, announced_by="run-0")).__name__ \
        == "SharedFixtureScheduling"


def test_a_worker_that_collected_a_test_the_others_did_not_fails_the_session(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sched = scheduler(tmp_path / "done", monkeypatch)
    reports: list[Any] = []
    sched.config.hook = SimpleNamespace(pytest_collectreport=lambda report: reports.append(report))
    nodes = [Worker("gw0"), Worker("gw1"), Worker("gw2")]
    for node in nodes:
        sched.add_node(node)
    sched.add_node_collection(nodes[0], SESSION)
    sched.add_node_collection(nodes[1], SESSION)
    sched.add_node_collection(nodes[2], [*FAST, "tests/unit/test_z.py::test_only_here"])
    sched.schedule()
    assert not any(node.sent for node in nodes), "nothing runs when the collections disagree"
    assert reports and reports[0].outcome == "failed", "the disagreement is reported as a collection error"


def test_unit_and_slow_test_bookkeeping() -> None:
    fast = set(FAST)
    assert idle_worker.fast_unit(FAST[:2], fast) and not idle_worker.fast_unit(MIXED, fast)
    assert idle_worker.slow_tests_left([{n: False for n in MIXED}], [], fast)
    assert idle_worker.slow_tests_left([], [{SLOW[0]: False, FAST[0]: True}], fast)
    assert not idle_worker.slow_tests_left([{FAST[0]: False}], [{SLOW[0]: True, FAST[1]: False}], fast)


@pytest.mark.parametrize(("workers", "dist", "option", "on"), [
    (3, "loadscope", True, True),
    (3, "loadscope", False, False),  # no --fill-idle
    (1, "loadscope", True, False),  # alone the worker would drop the slow tier from the session
    (3, "load", True, False),  # xdist's other schedulers need the same collection everywhere
])
def test_the_controller_decides_for_an_idle_time_worker(workers: int, dist: str, option: bool, on: bool) -> None:
    options = {"fill_idle": option, "dist": dist}
    config = SimpleNamespace(getoption=lambda name, default=None: options.get(name, default),
                             getvalue=options.__getitem__)
    assert idle_worker.enabled(config, workers) is on  # type: ignore[arg-type]


@pytest.mark.parametrize(("worker", "run_id", "fills"), [
    ("gw2", "run-1", True),
    ("gw1", "run-1", False),  # a slow-tier worker
    ("gw2", "run-0", False),  # announced by another session's controller (this one inherited it)
    ("gw2", None, False),  # a controller that decided against one announces nothing
])
def test_a_worker_knows_its_role_from_its_own_controllers_announcement(
        worker: str, run_id: str | None, fills: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(idle_worker.DONE_FLAG_ENV, raising=False)
    if run_id is not None:
        options = {"fill_idle": True, "dist": "loadscope", "testrunuid": run_id}
        controller = SimpleNamespace(getoption=lambda name, default=None: options.get(name, default),
                                     option=SimpleNamespace(testrunuid=run_id))
        idle_worker.announce(controller, tmp_path / "done")  # type: ignore[arg-type]
    # As xdist leaves a worker's options: `dist` reset to "no", whatever the controller ran with.
    options = {"fill_idle": True, "dist": "no"}
    config = SimpleNamespace(workerinput={"workerid": worker, "workercount": 3, "testrunuid": "run-1"},
                             getoption=lambda name, default=None: options.get(name, default),
                             getvalue=options.__getitem__)
    assert idle_worker.idle_time_flag(config) == (tmp_path / "done" if fills else None)  # type: ignore[arg-type]
    controller = SimpleNamespace(getoption=config.getoption)
    assert idle_worker.idle_time_flag(controller) is None, "the controller is no worker"  # type: ignore[arg-type]


def test_the_controller_tags_its_announcement_with_the_run_id_it_hands_its_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(idle_worker.DONE_FLAG_ENV, raising=False)
    controller = SimpleNamespace(getoption=lambda name, default=None: default, option=SimpleNamespace(testrunuid=None))
    idle_worker.announce(controller, tmp_path / "done")  # type: ignore[arg-type]
    assert controller.option.testrunuid, "xdist hands the workers the id the controller set (--testrunuid)"
    assert idle_worker.os.environ[idle_worker.DONE_FLAG_ENV] == f"{controller.option.testrunuid} {tmp_path / 'done'}"


def test_a_busy_machine_has_no_spare_core_and_the_flag_ends_the_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    looks: list[float] = []

    def busy(window_s: float = idle_worker.WINDOW_S) -> float:
        looks.append(window_s)
        if len(looks) == 3:
            (tmp_path / "done").touch()  # the controller saw the last slow test complete
        return 0.1

    monkeypatch.setattr(idle_worker, "idle_cores", busy)
    monkeypatch.setattr(idle_worker.time, "sleep", lambda s: None)
    idle_worker.wait_for_a_spare_core(tmp_path / "done", max_wait_s=60)
    assert len(looks) == 3, "it looked until the flag appeared, then stopped"

    looks.clear()
    monkeypatch.setattr(idle_worker, "idle_cores", lambda window_s=0.0: looks.append(window_s) or 1.5)
    idle_worker.wait_for_a_spare_core(tmp_path / "never", max_wait_s=60)
    assert len(looks) == 1, "a spare core at the first look: no wait"


def test_idle_cores_is_the_idle_share_of_the_ticks_times_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idle_worker.time, "sleep", lambda s: None)
    # user nice system idle iowait irq softirq: 100 ticks pass, 30 idle and 10 waiting on disk.
    lines = iter(["cpu  1000 0 500 2000 100 0 0\n", "cpu  1040 0 520 2030 110 0 0\n"])
    assert idle_worker.idle_cores(0.3, read=lambda: next(lines), cores=2) == pytest.approx(0.8)
    assert "cpu " in idle_worker.cpu_line()  # the machine's own line, as read on Linux


def test_the_idle_time_worker_collects_the_fast_tier_and_the_others_everything(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(idle_worker.DONE_FLAG_ENV, f"run-1 {tmp_path / 'done'}")

    class Item:
        def __init__(self, name: str, slow: bool) -> None:
            self.name, self.slow = name, slow

        def get_closest_marker(self, name: str) -> Any:
            return name == "slow" and self.slow or None

    def config(worker: str) -> Any:
        options = {"fill_idle": True, "dist": "no"}
        return SimpleNamespace(workerinput={"workerid": worker, "workercount": 3, "testrunuid": "run-1"},
                               getvalue=options.__getitem__,
                               getoption=lambda name, default=None: options.get(name, default))

    session = [Item("stack", True), Item("labels", False), Item("soak", True), Item("metrics", False)]
    for worker, expected in (("gw2", ["labels", "metrics"]), ("gw0", ["stack", "labels", "soak", "metrics"])):
        items = list(session)
        idle_worker.Plugin(config(worker)).pytest_collection_modifyitems(config(worker), items)  # type: ignore[arg-type]
        assert [item.name for item in items] == expected, worker


FAST_MODULES = ("tests/unit/test_labels.py", "tests/unit/test_metrics.py")
MIXED_MODULE = "tests/unit/test_process_gc.py"  # fast tests and slow ones (they start interpreters)


def test_a_real_session_hands_the_idle_time_worker_fast_modules_only_and_prints_its_tally(
        protein_process: Any) -> None:
    """`make test`'s options on three real xdist workers: a worker's options and environment are not
    the controller's (xdist resets `dist`), which stand-ins for them cannot show."""
    import re

    from tests.helpers import REPO

    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", idle_worker.DONE_FLAG_ENV))}
    done = protein_process.module("pytest", "-n", "3", "--dist", "loadscope", "--no-loadscope-reorder", "--fill-idle",
                                  "-p", "no:randomly", "-p", "no:cacheprovider", "-v", *FAST_MODULES, MIXED_MODULE,
                                  env=env, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    ran = re.findall(r"^\[(gw\d)\] \[\s*\d+%\] PASSED (.+?) *$", done.stdout, re.MULTILINE)
    [passed] = re.findall(r"^=+ (\d+) passed", done.stdout, re.MULTILINE)
    assert len(ran) == int(passed) and len({nodeid for _, nodeid in ran}) == len(ran), done.stdout[-3000:]
    on_idle_worker = [nodeid for worker, nodeid in ran if worker == "gw2"]
    assert on_idle_worker, "the idle-time worker was handed nothing"
    assert all(nodeid.startswith(FAST_MODULES) for nodeid in on_idle_worker), on_idle_worker
    assert any(nodeid.startswith(MIXED_MODULE) for _, nodeid in ran)
    assert f"idle-time worker gw2: {len(on_idle_worker)} fast-tier tests" in done.stdout, done.stdout[-1500:]
