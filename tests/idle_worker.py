"""A third xdist worker that runs fast-tier tests in the time the slow tier leaves a core idle.

`make test` runs the slow tier on two workers, and about a tenth of the cores' time was idle in
it (170 of 1610 core-seconds, 2026-12-07): both workers waiting at once, on heartbeats, polls and
bounds. The fast tier, CPU-bound, ran after the slow modules, ~110 s on both cores at the end. With
`--fill-idle` (`make test FILL_IDLE=1`: `-n 3 --fill-idle`), the last worker of `-n N` is the
idle-time worker:

- it collects only the fast tier (tests/tiers.py marks the slow one), and the scheduler hands it only
  units of work whose every test it collected (`IdleTimeScheduling`, tests/tiers.py);
- while slow tests remain, it starts a test only when the machine has a core to spare
  (`wait_for_a_spare_core`, /proc/stat), so it takes no CPU the slow tier's servers, workers and
  bounds wait for; it never pauses a test it started;
- once the controller has seen the last slow test complete it writes a flag file
  (PROTEIN_TESTS_SLOW_TIER_DONE), and from then on the worker runs like the others, sharing the fast
  tier's rest with them.

Tests keep every assertion they had: which worker runs a test changes, not what it checks; a test
that needs its own deadline is on a busy machine here as on any other. On this 2-core machine it
filled 55-70 of those idle core-seconds and its session cost ~40 CPU-s: even, so `make test` leaves
it off; it is for machines whose slow tier leaves whole cores idle (docs/testing.md).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

OPTION = "--fill-idle"
DONE_FLAG_ENV = "PROTEIN_TESTS_SLOW_TIER_DONE"
# A core counts as spare when this much of one was idle over the window: a fast test lasts 0.05-1 s
# of CPU, so a core idle for the window is likely idle for the test.
SPARE_CORE = 0.6
WINDOW_S = 0.3
# Never wait longer than this for one test: the flag file ends the waits, this only bounds a machine
# that stays busy without it (another session's load, a controller that could not write the flag).
MAX_WAIT_S = 120.0


def idle_worker_id(workers: int) -> str:
    """The idle-time worker of `-n workers` (xdist names its workers gw0..gw{n-1}): the last."""
    return f"gw{workers - 1}"


def enabled(config: pytest.Config, workers: int) -> bool:
    """The controller's decision: `--fill-idle` applies when asked for, with `--dist loadscope`
    (whose scheduler hands the worker units of its own collection) and at least one other worker
    for the slow tier."""
    return bool(config.getoption("fill_idle", False)) and config.getvalue("dist") == "loadscope" and workers >= 2


def announce(config: pytest.Config, flag: Path) -> None:
    """The controller tells its workers that its last one is the idle-time worker, and where the
    flag file will appear: xdist resets a worker's `dist` and `numprocesses` options, so a worker
    cannot decide for itself. Through the environment they inherit, tagged with this run's id (the
    controller sets it, xdist hands it to each worker): a session started inside a test inherits
    the variable too, and its own workers must not take it for theirs."""
    run_id = config.getoption("testrunuid", None) or uuid.uuid4().hex
    config.option.testrunuid = run_id
    os.environ[DONE_FLAG_ENV] = f"{run_id} {flag}"


def announcement() -> tuple[str, Path] | None:
    """(run id, flag path) of the announcement in this process's environment, if any."""
    run_id, _, flag = os.environ.get(DONE_FLAG_ENV, "").partition(" ")
    return (run_id, Path(flag)) if flag else None


def announced_flag(config: pytest.Config) -> Path | None:
    """The flag path of this controller's own announcement (None when the variable is another
    session's, or none was made: the option does not apply)."""
    found = announcement()
    return found[1] if found and found[0] == config.getoption("testrunuid", None) else None


def idle_time_flag(config: pytest.Config) -> Path | None:
    """The flag file to watch when this process is the idle-time worker of its controller; else None."""
    workerinput = getattr(config, "workerinput", None)
    found = announcement()
    if not workerinput or not found or found[0] != workerinput.get("testrunuid"):
        return None
    return found[1] if workerinput["workerid"] == idle_worker_id(int(workerinput["workercount"])) else None


def fast_unit(unit: Iterable[str], fast: set[str]) -> bool:
    """Every test of this unit of work is one the idle-time worker collected (the fast tier)."""
    return all(nodeid in fast for nodeid in unit)


def slow_tests_left(queued: Iterable[Mapping[str, bool]], assigned: Iterable[Mapping[str, bool]],
                    fast: set[str]) -> bool:
    """A slow test not yet run: in a unit still queued, or assigned and not completed."""
    return any(not fast_unit(unit, fast) for unit in queued) or any(
        not completed and nodeid not in fast for unit in assigned for nodeid, completed in unit.items())


def cpu_line() -> str:
    """The machine's line of /proc/stat: ticks spent in user, nice, system, idle, iowait, ..."""
    with open("/proc/stat") as stat:
        return stat.readline()


def idle_cores(window_s: float = WINDOW_S, read: Callable[[], str] = cpu_line, cores: int | None = None) -> float:
    """Cores idle over the next ``window_s`` (idle and iowait time over all time, of all cores)."""

    def sample() -> tuple[int, int]:
        ticks = [int(field) for field in read().split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)

    idle_before, total_before = sample()
    time.sleep(window_s)
    idle_after, total_after = sample()
    if total_after == total_before:
        return 0.0
    return (idle_after - idle_before) / (total_after - total_before) * (cores or os.cpu_count() or 1)


@dataclass
class Tally:
    """What the idle-time worker did, sent to the controller (xdist's workeroutput) for its summary."""

    tests: int = 0
    waited: int = 0  # tests started only after a wait
    wait_s: float = 0.0
    started_after_done: int = 0  # tests started once the slow tier was done

    def add(self, wait_s: float, done: bool) -> None:
        self.tests += 1
        self.waited += wait_s > WINDOW_S * 1.5  # more than one look at the cores
        self.wait_s += wait_s
        self.started_after_done += done

    def line(self, worker: str) -> str:
        return (f"idle-time worker {worker}: {self.tests} fast-tier tests, {self.tests - self.started_after_done} "
                f"while slow tests ran ({self.waited} after waiting for a spare core, {self.wait_s:.0f} s of waits), "
                f"{self.started_after_done} after")



def wait_for_a_spare_core(done_flag: Path, max_wait_s: float = MAX_WAIT_S) -> float:
    """Returns once a core is spare, the slow tier is done (the flag exists) or max_wait_s passed;
    the seconds waited. On a system without /proc/stat it never waits."""
    started = time.monotonic()
    while not done_flag.exists() and time.monotonic() - started < max_wait_s:
        try:
            if idle_cores() >= SPARE_CORE:
                break
        except OSError:
            break
    return time.monotonic() - started


class Plugin:
    """Hooks of a `--fill-idle` session: the idle-time worker's collection, its waits and its tally;
    the controller's summary line. Registered by tests/conftest.py; the role is read once, when the
    session is configured (a session a test runs inside this one may change the environment)."""

    NAME = "protein-idle-worker"

    def __init__(self, config: pytest.Config) -> None:
        self.flag = idle_time_flag(config)
        self.tally = Tally()  # the idle-time worker's
        self.lines: list[str] = []  # the controller's, one per idle-time worker

    @pytest.hookimpl(trylast=True)  # after the tiers marked the slow tests (tests/conftest.py)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.flag is not None:
            items[:] = [item for item in items if not item.get_closest_marker("slow")]

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        if self.flag is not None:
            waited = wait_for_a_spare_core(self.flag)
            self.tally.add(waited, self.flag.exists() and waited <= WINDOW_S * 1.5)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.flag is not None:
            session.config.workeroutput["idle_worker"] = asdict(self.tally)  # type: ignore[attr-defined]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        if tally := getattr(node, "workeroutput", {}).get("idle_worker"):
            self.lines.append(Tally(**tally).line(node.gateway.id))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)
