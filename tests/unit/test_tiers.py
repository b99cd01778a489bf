"""The two tiers: `make check` runs `pytest -m "not slow"`, and the slow marker comes from the fixtures
a test uses (tests/tiers.py SLOW_FIXTURES), so these tests collect the suite the way each tier does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.conftest import FreshInterpreterInTheFastTier, pytest_xdist_make_scheduler, torch_threads_per_worker
from tests.tiers import (
    DISK_REFUSED_EXIT,
    SHARED_FIXTURE_MODULES,
    SLOW_FIXTURES,
    DurationRecorder,
    disk_refusal,
    last_in_unit_last,
    load_durations,
    slow_modules_first,
    unlisted_shared_fixture_modules,
)

TESTS = Path(__file__).resolve().parents[1]


class Collected:
    """A pytest plugin that keeps what a collection selected and what it deselected."""

    def __init__(self) -> None:
        self.items: list[pytest.Item] = []
        self.deselected: list[pytest.Item] = []

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected.extend(items)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        self.items = list(session.items)


def collect(*args: str) -> Collected:
    plugin = Collected()
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *args],
                       plugins=[plugin])
    assert code == pytest.ExitCode.OK, f"collection failed with {code!r}"
    return plugin


def slow_fixtures_of(item: pytest.Item) -> set[str]:
    return set(getattr(item, "fixturenames", ())) & SLOW_FIXTURES.keys()


def test_the_fast_tier_uses_no_server_cluster_training_or_subprocess_fixture() -> None:
    collected = collect("-m", "not slow", str(TESTS))
    offenders = {item.nodeid: sorted(slow_fixtures_of(item)) for item in collected.items if slow_fixtures_of(item)}
    assert offenders == {}
    # The fast tier is most of the suite and the slow one is not empty: the selection did something.
    assert len(collected.items) > 300 and len(collected.deselected) > 20, (len(collected.items),
                                                                           len(collected.deselected))


def test_the_hook_marks_a_test_that_uses_a_server_fixture_and_says_why() -> None:
    collected = collect(str(TESTS / "integration" / "test_events.py"), str(TESTS / "unit" / "test_gate.py"))
    events = [item for item in collected.items if "test_events.py" in item.nodeid]
    gate = [item for item in collected.items if "test_gate.py" in item.nodeid]
    assert events and gate
    for item in events:  # every one uses prefect_stack (a server, a worker, deployments)
        marker = item.get_closest_marker("slow")
        assert marker is not None, item.nodeid
        assert "prefect_stack" in marker.kwargs["reason"], marker.kwargs
    assert [item.nodeid for item in gate if item.get_closest_marker("slow")] == []


def test_a_fast_tier_test_that_starts_this_interpreter_fails_and_other_programs_run() -> None:
    """This test is in the fast tier itself, so the guard is on here."""
    for argv in ([sys.executable, "-c", "pass"], [Path(sys.executable), "-c", "pass"],
                 [str(Path(sys.executable).resolve()), "-c", "pass"]):
        with pytest.raises(FreshInterpreterInTheFastTier, match=r"starts .*python.*through the protein_process"):
            subprocess.run(argv, capture_output=True, timeout=60)
    with pytest.raises(FreshInterpreterInTheFastTier, match="a fresh interpreter per case is the slow tier's"):
        subprocess.Popen(["anything"], executable=sys.executable)
    assert subprocess.run([shutil.which("true") or "/bin/true"], timeout=60).returncode == 0


def test_too_little_disk_for_the_slow_tier_is_one_line_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert disk_refusal("/scratch", 8 * 1024**3, 7.0) is None
    line = disk_refusal("/scratch", 2 * 1024**3, 7.0)
    assert line is not None and "\n" not in line
    assert line.startswith("/scratch has 2.0 GB free; the slow tier needs about 7 GB there")
    # Through the hook: a slow test selected on a "disk" too small stops the session before any setup
    # (--setup-plan runs no fixture, so without the check this returns OK at once).
    monkeypatch.setenv("PROTEIN_TEST_MIN_FREE_GB", "1e9")
    code = pytest.main(["-q", "--setup-plan", "-p", "no:cacheprovider", "-p", "no:randomly",
                        str(TESTS / "integration" / "test_first_run.py")])
    out = capsys.readouterr().out
    assert code == DISK_REFUSED_EXIT and "GB free; the slow tier needs about 1e+09 GB there" in out, out[-2000:]
    # The fast tier needs no such room.
    code = pytest.main(["-q", "--setup-plan", "-p", "no:cacheprovider", "-p", "no:randomly",
                        str(TESTS / "unit" / "test_labels.py")])
    assert code == pytest.ExitCode.OK
    # Those nested sessions left this session's Prefect home and image cache where they were.
    assert Path(os.environ["PREFECT_HOME"]).is_dir() and Path(os.environ["PROTEIN_CACHE_DIR"]).is_dir()


def test_temp_files_of_the_code_under_test_stay_in_the_session_scratch(tmp_path: Path) -> None:
    """What the code under test leaves in the temp folder (a report kept by design, the weights folder
    of a SIGKILLed training) goes when the session does; a failed test's tmp_path stays for a look."""
    from tests.conftest import SESSION_SCRATCH

    made_here = Path(tempfile.mkdtemp(prefix="protein-probe-"))
    made_by_a_child = Path(subprocess.run(["mktemp", "-d"], capture_output=True, text=True, check=True).stdout.strip())
    for folder in (made_here, made_by_a_child):
        assert folder.is_relative_to(SESSION_SCRATCH), folder
        shutil.rmtree(folder)
    assert not tmp_path.is_relative_to(SESSION_SCRATCH), tmp_path


def test_an_xdist_session_refuses_a_small_disk_before_it_starts_its_workers(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # Workers are fresh interpreters, which the fast tier never starts: the refusal has to come first.
    monkeypatch.setenv("PROTEIN_TEST_MIN_FREE_GB", "1e9")
    code = pytest.main(["-q", "-n", "2", "--setup-plan", "-p", "no:cacheprovider", "-p", "no:randomly",
                        str(TESTS / "integration" / "test_first_run.py")])
    out = capsys.readouterr().out
    assert code == DISK_REFUSED_EXIT and "GB free; the slow tier needs about 1e+09 GB there" in out, out[-2000:]


class OrderedItem:
    """What slow_modules_first reads of a test: its module, its markers."""

    def __init__(self, path: str, slow: bool = False, long_running: bool = False) -> None:
        self.path, self.slow, self.long_running = TESTS.parent / path, slow, long_running

    def get_closest_marker(self, name: str) -> object:
        return {"slow": self.slow, "long_running": self.long_running}.get(name) or None


def test_xdist_workers_take_the_long_units_first_then_the_slow_ones_then_the_fast_each_longest_first() -> None:
    harness = sorted(SHARED_FIXTURE_MODULES["prefect_harness"])
    order = [OrderedItem("tests/unit/a.py"), OrderedItem("tests/int/z.py"), OrderedItem("tests/int/z.py", slow=True),
             OrderedItem("tests/unit/b.py"), OrderedItem(harness[0], slow=True),
             OrderedItem("tests/int/c.py", slow=True), OrderedItem(harness[1], slow=True),
             OrderedItem("tests/int/soak.py", slow=True, long_running=True),
             OrderedItem("tests/unit/new.py"), OrderedItem("tests/unit/e.py"), OrderedItem("tests/int/d.py", slow=True),
             OrderedItem("tests/unit/f.py"), OrderedItem("tests/int/new.py", slow=True)]
    # The harness's modules are one unit: 30 + 25 s outweighs c.py's 50 s alone.
    seconds = {"tests/unit/a.py": 1.0, "tests/int/z.py": 40.0, "tests/unit/b.py": 9.0, harness[0]: 30.0,
               "tests/int/c.py": 50.0, harness[1]: 25.0, "tests/int/soak.py": 300.0, "tests/int/d.py": 40.0,
               "tests/unit/e.py": 3.0, "tests/unit/f.py": 9.0}
    ordered = slow_modules_first(order, seconds, TESTS.parent)  # type: ignore[arg-type]
    assert [(i.path.relative_to(TESTS.parent).as_posix(), i.slow) for i in ordered] == [
        ("tests/int/soak.py", True),
        ("tests/int/new.py", True),  # not in the table: first of its group
        (harness[0], True), (harness[1], True), ("tests/int/c.py", True),
        ("tests/int/z.py", False), ("tests/int/z.py", True), ("tests/int/d.py", True),  # a tie: the shuffle's order
        ("tests/unit/new.py", False),
        ("tests/unit/b.py", False), ("tests/unit/f.py", False), ("tests/unit/e.py", False), ("tests/unit/a.py", False)]
    # Without the table: every group in the shuffle's order, as before it existed.
    assert [i.path.relative_to(TESTS.parent).as_posix() for i in slow_modules_first(  # type: ignore[arg-type]
        order, {}, TESTS.parent)] == [
        "tests/int/soak.py", "tests/int/z.py", "tests/int/z.py", harness[0], "tests/int/c.py", harness[1],
        "tests/int/d.py", "tests/int/new.py", "tests/unit/a.py", "tests/unit/b.py", "tests/unit/new.py",
        "tests/unit/e.py", "tests/unit/f.py"]


def test_the_durations_table_is_read_and_a_damaged_one_orders_as_the_shuffle(tmp_path: Path) -> None:
    table = tmp_path / "durations.json"
    table.write_text(json.dumps({"measured_by": "x", "seconds": {"tests/a.py": 3.5}}))
    assert load_durations(table) == {"tests/a.py": 3.5}
    for damaged in ("{", '{"seconds": [1]}', '{"seconds": {"tests/a.py": "slow"}}', "[]"):
        table.write_text(damaged)
        assert load_durations(table) == {}, damaged
    assert load_durations(tmp_path / "missing.json") == {}


def test_the_recorder_sums_each_modules_phases_and_writes_only_a_passed_session(tmp_path: Path) -> None:
    table = tmp_path / "durations.json"
    recorder = DurationRecorder(table)
    for nodeid, duration in (("tests/a.py::test_x", 1.25), ("tests/a.py::test_x", 2.0), ("tests/b.py::G::test_y", 4.0)):
        recorder.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, duration=duration))  # type: ignore[arg-type]
    recorder.pytest_sessionfinish(None, pytest.ExitCode.TESTS_FAILED)  # type: ignore[arg-type]
    assert not table.exists()
    recorder.pytest_sessionfinish(None, pytest.ExitCode.OK)  # type: ignore[arg-type]
    assert load_durations(table) == {"tests/a.py": 3.2, "tests/b.py": 4.0}


def test_xdist_workers_share_the_cores_among_their_torch_threads() -> None:
    assert [torch_threads_per_worker(cpus, 2) for cpus in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert torch_threads_per_worker(4, 0) == 4


def test_torch_gets_the_workers_share_of_the_cores_under_xdist_and_is_left_alone_otherwise() -> None:
    import torch

    from tests.conftest import USER_OMP_NUM_THREADS

    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    expected = USER_OMP_NUM_THREADS
    if workers and USER_OMP_NUM_THREADS is None:
        expected = str(torch_threads_per_worker(os.cpu_count() or 1, int(workers)))
    assert os.environ.get("OMP_NUM_THREADS") == expected  # what the processes tests start inherit
    if expected is not None:
        assert torch.get_num_threads() == int(expected)


class Worker:
    """What xdist's scheduler sees of a worker: the tests it is sent, by index in its collection."""

    def __init__(self, name: str) -> None:
        self.gateway = SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent += indices

    def shutdown(self) -> None:
        self.shutting_down = True


def schedule_make_test(collection: list[str]) -> list[list[str]]:
    """The tests each of make test's two workers is sent, by its scheduler (pytest_xdist_make_scheduler)."""
    config = SimpleNamespace(getvalue={"dist": "loadscope", "tx": ["2*popen"]}.__getitem__,
                             getoption=lambda name, default=None: default,  # no --fill-idle: tests/idle_worker.py
                             option=SimpleNamespace(loadscopereorder=False))
    scheduler = pytest_xdist_make_scheduler(config, None)  # type: ignore[arg-type]
    workers = [Worker("gw0"), Worker("gw1")]
    for worker in workers:
        scheduler.add_node(worker)
        scheduler.add_node_collection(worker, collection)
    scheduler.schedule()
    while any(not w.shutting_down for w in workers):  # each worker asks for more as it runs out
        for worker in workers:
            for index in worker.sent:
                scheduler.mark_test_complete(worker, index)
            if not worker.shutting_down:
                scheduler._reschedule(worker)
    return [[collection[i] for i in w.sent] for w in workers]


def test_make_test_starts_each_shared_fixture_on_one_worker_and_hands_out_other_modules_whole() -> None:
    stack = sorted(SHARED_FIXTURE_MODULES["prefect_stack"])
    harness = sorted(SHARED_FIXTURE_MODULES["prefect_harness"])
    # As the workers collect them: the slow modules (the shared fixtures' among them) first. Module by
    # module, the first two would go to the two workers; test by test, a.py's four would be spread over both.
    collection = [f"{stack[0]}::test_a", f"{stack[0]}::test_b", f"{harness[0]}::test_h", f"{stack[1]}::test_c",
                  f"{harness[1]}::test_i", f"{stack[2]}::test_d", f"{harness[2]}::test_j",
                  "tests/unit/a.py::test_x", "tests/unit/a.py::test_y", "tests/unit/a.py::test_u",
                  "tests/unit/a.py::test_t", "tests/unit/b.py::Group::test_z", "tests/unit/b.py::Group::test_v",
                  "tests/unit/c.py::test_w"]
    sent = schedule_make_test(collection)
    for modules in (stack, harness):
        [together] = [tests for tests in sent if any(t.startswith(modules[0]) for t in tests)]
        assert {t for t in collection if t.split("::")[0] in modules} <= set(together), sent
    for module in ("tests/unit/a.py", "tests/unit/b.py::Group"):  # loadscope's units stay whole
        assert len([tests for tests in sent if any(t.startswith(module) for t in tests)]) == 1, sent
    assert sorted(t for tests in sent for t in tests) == sorted(collection)
    assert all(sent), f"one worker got nothing: {sent}"


def test_a_module_that_uses_a_shared_fixture_must_be_listed_and_only_once() -> None:
    class Item:
        def __init__(self, path: str, fixtures: tuple[str, ...]) -> None:
            self.path, self.fixturenames = TESTS.parent / path, fixtures

    listed = Item(sorted(SHARED_FIXTURE_MODULES["prefect_stack"])[0], ("prefect_stack", "tmp_path"))
    listed_harness = Item(sorted(SHARED_FIXTURE_MODULES["prefect_harness"])[0], ("prefect_harness",))
    stray = Item("tests/integration/test_new.py", ("tmp_path", "prefect_stack"))
    other = Item("tests/integration/test_other.py", ("prefect_harness",))
    plain = Item("tests/integration/test_plain.py", ("tmp_path",))
    items: list[Any] = [listed, listed_harness, stray, other, plain]
    assert unlisted_shared_fixture_modules(items, TESTS.parent) == [
        "tests/integration/test_new.py uses prefect_stack", "tests/integration/test_other.py uses prefect_harness"]
    assert unlisted_shared_fixture_modules([listed, listed_harness, plain], TESTS.parent) == []


def test_a_module_listed_for_two_shared_fixtures_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.tiers

    module = sorted(SHARED_FIXTURE_MODULES["prefect_stack"])[0]
    twice = {**SHARED_FIXTURE_MODULES, "prefect_harness": SHARED_FIXTURE_MODULES["prefect_harness"] | {module}}
    monkeypatch.setattr(tests.tiers, "SHARED_FIXTURE_MODULES", twice)
    assert unlisted_shared_fixture_modules([], TESTS.parent) == [f"{module} is listed for two shared fixtures"]


def test_the_listed_modules_are_the_ones_that_use_each_shared_fixture() -> None:
    """Not lists that merely name files: each listed module exists and uses its fixture (a module
    that stopped using it would still be pinned to that fixture's worker for nothing)."""
    listed = sorted({module for modules in SHARED_FIXTURE_MODULES.values() for module in modules})
    collected = collect(*(str(TESTS.parent / module) for module in listed))
    for fixture, modules in SHARED_FIXTURE_MODULES.items():
        users = {item.path.relative_to(TESTS.parent).as_posix() for item in collected.items
                 if fixture in item.fixturenames}
        assert users == set(modules), fixture


def test_a_test_marked_last_in_unit_runs_after_its_units_other_tests_and_nothing_else_moves() -> None:
    class Item:
        def __init__(self, path: str, name: str, last: bool = False) -> None:
            self.path, self.name, self.last = TESTS.parent / path, name, last

        def get_closest_marker(self, name: str) -> object:
            return (name == "last_in_unit" and self.last) or None

    stack_modules = sorted(SHARED_FIXTURE_MODULES["prefect_stack"])
    events = next(module for module in stack_modules if module.endswith("test_events.py"))
    other = next(module for module in stack_modules if module != events)
    items = [Item(events, "zombie", last=True), Item(events, "push"), Item("tests/unit/a.py", "x"),
             Item(other, "browser"), Item("tests/unit/b.py", "y", last=True), Item("tests/unit/b.py", "z"),
             Item("tests/unit/c.py", "w")]
    ordered = last_in_unit_last(items, TESTS.parent)  # type: ignore[arg-type]
    assert [i.name for i in ordered] == ["push", "x", "browser", "zombie", "z", "y", "w"]


def test_the_zombie_test_runs_after_every_other_test_of_the_stack_whatever_the_shuffle() -> None:
    modules = [str(TESTS.parent / module) for module in sorted(SHARED_FIXTURE_MODULES["prefect_stack"])]
    for seed in ("1", "2", "3"):
        plugin = Collected()
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", f"--randomly-seed={seed}", *modules],
                           plugins=[plugin])
        assert code == pytest.ExitCode.OK
        assert {item.path.name for item in plugin.items} == {Path(m).name for m in modules}, seed
        assert plugin.items[-1].name == "test_run_without_heartbeats_is_crashed_and_alerted", seed


EARLY_RELEASE_CONFTEST = '''
from pathlib import Path

import pytest

from tests.early_release import EarlyRelease

LOG = Path(__file__).with_name("events.log")


def log(line):
    with LOG.open("a") as out:
        out.write(line + "\\n")


def pytest_configure(config):
    config.pluginmanager.register(EarlyRelease(["server"]), EarlyRelease.NAME)


@pytest.fixture(scope="session")
def server(request):
    up = [True]

    def release():
        if up.pop() if up else False:
            log("server released")

    log("server up")
    EarlyRelease.of(request.config).hold("server", release)
    yield
    release()


@pytest.fixture(scope="module")
def module_client(server):
    yield
    log("module client closed")


@pytest.fixture(autouse=True)
def named(request):
    log(request.node.name)
'''


def run_session(folder: Path, modules: dict[str, str], *plugins: object) -> int | pytest.ExitCode:
    """`modules` (file name -> source) written to `folder` beside EARLY_RELEASE_CONFTEST, run in that
    order in a pytest session of their own in this process. The names must differ from test to test:
    this process keeps an imported test module by its name."""
    (folder / "conftest.py").write_text(EARLY_RELEASE_CONFTEST)
    for name, source in modules.items():
        (folder / name).write_text(source)
    return pytest.main([*(str(folder / name) for name in modules), "-q", "-p", "no:randomly", "-p",
                        "no:cacheprovider", "-p", "no:xdist", "--import-mode=importlib", "--rootdir", str(folder)],
                       plugins=list(plugins))


def test_a_session_fixture_is_released_after_its_last_user_and_that_users_module(tmp_path: Path) -> None:
    """The shared stack's early stop (tests/early_release.py), in a session of its own: released
    after the last test that uses it once its module, whose module fixture is built on it, ends;
    before the next module, not at the session's end."""
    code = run_session(tmp_path, {
        "test_last_user_a.py": "def test_a1(server): pass\n\ndef test_a2(module_client): pass\n\ndef test_a3(): pass\n",
        "test_last_user_b.py": "def test_b1(): pass\n\ndef test_b2(): pass\n"})
    assert code == pytest.ExitCode.OK
    assert (tmp_path / "events.log").read_text().splitlines() == [
        "server up", "test_a1", "test_a2", "test_a3", "module client closed", "server released", "test_b1", "test_b2"]


class RunOnly:
    """Runs only the named tests of the collection, each with the next of them as `nextitem`, as an
    xdist worker runs the tests it is handed out of the collection it made."""

    def __init__(self, *names: str) -> None:
        self.names = names

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        items = [item for item in session.items if item.name in self.names]
        for item, nextitem in zip(items, [*items[1:], None], strict=True):
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        return True


def test_a_session_fixture_whose_users_this_process_did_not_all_run_is_released_at_the_end(tmp_path: Path) -> None:
    """A worker handed only some of the users (xdist's test-by-test modes) cannot know that the
    others went elsewhere: the fixture is released at the session's end, as pytest would."""
    code = run_session(tmp_path, {"test_partial_a.py": "def test_a1(server): pass\n\ndef test_a2(server): pass\n",
                                  "test_partial_b.py": "def test_b1(): pass\n"},
                       RunOnly("test_a1", "test_b1"))
    assert code == pytest.ExitCode.OK
    assert (tmp_path / "events.log").read_text().splitlines() == ["server up", "test_a1", "test_b1", "server released"]


def test_every_shared_fixture_hands_its_stop_to_the_early_release() -> None:
    """Each fixture in SHARED_FIXTURE_MODULES is defined in tests/integration/conftest.py and calls
    `EarlyRelease...hold(<its name>, ...)`: without that, its unit's worker keeps it up, idle, until
    the session's end."""
    import ast

    source = (TESTS / "integration" / "conftest.py").read_text()
    defined = {node.name: node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}

    def held(function: ast.FunctionDef) -> set[str]:
        names = set()
        for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
            if isinstance(call.func, ast.Attribute) and call.func.attr == "hold" and call.args \
                    and isinstance(call.args[0], ast.Constant):
                names.add(call.args[0].value)
        return names

    for fixture in SHARED_FIXTURE_MODULES:
        assert fixture in defined, f"{fixture} is not defined in tests/integration/conftest.py"
        assert held(defined[fixture]) == {fixture}, f"{fixture} does not hand its stop to EarlyRelease"
