"""`datasets gc` and `datasets push` exclude each other (protein/data/gc_coordination.py), on a real
moto_server: the interleavings that lost objects before are driven step by step (a push paused after
its listing, a gc paused under its lock), and the new dataset stays complete; stale markers and
abandoned locks expire; a second gc is refused."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import protein.data.dataset_gc as dataset_gc
import protein.data.gc_coordination as coordination
import protein.data.push as push_module
from protein.cli import main as protein_main
from protein.data.dataset_gc import collect_orphans
from protein.data.gc_coordination import GC_LOCK_KEY, PUSHES_PREFIX, CoordinationTimes, GcLock
from protein.data.manifest import OBJECTS_PREFIX, manifest_key
from protein.data.push import push_dataset
from protein.errors import StoreBusy
from protein.storage import Store, open_store
from tests.helpers import ModuleClock, write_dataset

pytestmark = pytest.mark.integration

LABELS = {"1": "0", "2": "6 4", "3": "9", "4": "1"}
TEST_IDS = ["12", "10"]
# Polls and bounds short enough for a test; the same for both sides, as in production.
FAST = CoordinationTimes(poll_s=0.05, push_wait_s=60)
WAIT_S = 60


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "d", LABELS, TEST_IDS)


@pytest.fixture
def paused_gc_plan(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """gc, once it holds its lock, stops before it plans: `planning` is set when it gets there, and
    it goes on when the test sets `resume` (or after WAIT_S)."""
    planning, resume = threading.Event(), threading.Event()
    real_plan = dataset_gc.plan_objects_gc

    def pause_then_plan(target: Store, min_age_s: float) -> dataset_gc.ObjectsGcPlan:
        planning.set()
        resume.wait(WAIT_S)
        return real_plan(target, min_age_s)

    monkeypatch.setattr(dataset_gc, "plan_objects_gc", pause_then_plan)
    return planning, resume


def missing_objects(store: Store, fingerprint: str) -> list[str]:
    """The content objects the dataset's manifest names that the store lacks (complete: none)."""
    manifest = json.loads(store.get_bytes(manifest_key(fingerprint)))
    stored = set(store.list(f"{OBJECTS_PREFIX}/"))
    return sorted(name for name, entry in manifest["files"].items()
                  if f"{OBJECTS_PREFIX}/{entry['sha256'][:2]}/{entry['sha256']}" not in stored)


def orphaned(store: Store, data: Path) -> tuple[str, int]:
    """Push ``data`` and forget it (delete its manifest): every object it uploaded is an orphan."""
    first = push_dataset(str(data), store)
    store.delete(manifest_key(first.fingerprint))
    return first.fingerprint, len(store.list(f"{OBJECTS_PREFIX}/"))


def in_thread(target: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = target()
        except BaseException as exc:  # handed to the test thread, which asserts on it
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def error_lines(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if " error: " in line]


def test_gc_while_a_push_relies_on_old_orphans_deletes_nothing_and_the_dataset_stays_complete(
        data: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The interleaving that broke before: the push lists, finds every object stored (old orphans), and
    is paused; gc runs to its end (both manifest listings and the delete) before the push's manifest."""
    store = open_store(s3_bucket)
    fp, objects = orphaned(store, data)
    listed, resume = threading.Event(), threading.Event()
    real_listing = push_module.stored_objects

    def listing_then_pause(target: Store) -> dict[str, int]:
        present = real_listing(target)
        listed.set()
        resume.wait(WAIT_S)
        return present

    monkeypatch.setattr(push_module, "stored_objects", listing_then_pause)
    push, pushed = in_thread(lambda: push_dataset(str(data), store, times=FAST))
    assert listed.wait(WAIT_S)
    # A dry run sees the push and writes nothing; the real gc (guard 0: every orphan counts as old) refuses.
    dry_code = protein_main(["datasets", "gc", "--store", s3_bucket, "--older-than-hours", "0", "--dry-run"])
    dry = json.loads(capsys.readouterr().out)
    gc_code = protein_main(["datasets", "gc", "--store", s3_bucket, "--older-than-hours", "0"])
    gc_err = capsys.readouterr().err
    resume.set()
    push.join(WAIT_S)
    assert "error" not in pushed, pushed
    assert pushed["value"].uploaded == 0 and pushed["value"].fingerprint == fp
    assert missing_objects(store, fp) == []  # every object the new manifest names exists
    assert dry_code == 0 and (dry["push_markers"], dry["orphans"], dry["deleted"]) == (1, objects, 0)
    assert gc_code == 9
    [line] = error_lines(gc_err)
    assert line.startswith(f"protein datasets: error: deleted no content object: 1 push(es) in progress: "
                           f"{s3_bucket}/{PUSHES_PREFIX}") and "; run gc again when they end" in line
    assert len(store.list(f"{OBJECTS_PREFIX}/")) == objects
    # Done, the push removed its marker and gc released its lock: gc runs, and nothing is orphaned now.
    assert store.list(PUSHES_PREFIX) == [] and not store.exists(GC_LOCK_KEY)
    assert protein_main(["datasets", "gc", "--store", s3_bucket, "--older-than-hours", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 0


def test_a_push_during_a_gc_waits_for_it_then_uploads_what_gc_deleted(
        data: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
        paused_gc_plan: tuple[threading.Event, threading.Event]) -> None:
    """The other order: gc holds its lock (paused before it plans); a push starts, writes its marker,
    sees the lock and waits; gc deletes the old orphans and ends; the push lists afresh and re-uploads."""
    store = open_store(s3_bucket)
    fp, objects = orphaned(store, data)
    planning, resume_gc = paused_gc_plan
    gc_done = threading.Event()

    def gc_then_signal() -> dict[str, object]:
        try:
            return collect_orphans(store, 0, times=FAST)
        finally:
            gc_done.set()

    gc, collected = in_thread(gc_then_signal)
    assert planning.wait(WAIT_S)

    push_saw_lock, push_listed = threading.Event(), threading.Event()
    real_info, real_listing = coordination._info, push_module.stored_objects

    def info_watched(target: Store, key: str) -> Any:
        found = real_info(target, key)
        if key == GC_LOCK_KEY and found is not None:
            push_saw_lock.set()
        return found

    def listing_watched(target: Store) -> dict[str, int]:
        # Listed, then held until the gc has ended: harmless when the push waited out the lock (gc is
        # over), and the old race when it did not (gc deletes what this listing found).
        push_listed.set()
        present = real_listing(target)
        gc_done.wait(WAIT_S)
        return present

    monkeypatch.setattr(coordination, "_info", info_watched)
    monkeypatch.setattr(push_module, "stored_objects", listing_watched)
    push, pushed = in_thread(lambda: push_dataset(str(data), store, times=FAST))
    deadline = time.monotonic() + WAIT_S
    while not (push_saw_lock.is_set() or push_listed.is_set()) and time.monotonic() < deadline:
        time.sleep(0.01)
    listed_under_the_lock = push_listed.is_set()
    resume_gc.set()
    gc.join(WAIT_S)
    push.join(WAIT_S)
    assert "error" not in pushed and "error" not in collected, (pushed, collected)
    assert missing_objects(store, fp) == []  # the new dataset is complete
    assert not listed_under_the_lock, "the push listed the objects while a gc held its lock"
    assert collected["value"]["deleted"] == objects and pushed["value"].uploaded == objects
    assert store.list(PUSHES_PREFIX) == [] and not store.exists(GC_LOCK_KEY)


def test_a_push_while_a_gc_holds_the_lock_is_refused_after_its_wait(
        data: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    store = open_store(s3_bucket)
    lock = GcLock.acquire(store, FAST)
    assert protein_main(["datasets", "push", "--data", str(data), "--store", s3_bucket,
                         "--wait-for-gc-minutes", "0"]) == 9
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"protein datasets: error: a datasets gc holds {s3_bucket}/{GC_LOCK_KEY} (host ")
    assert line.endswith("; waited 0 s; push again when it ends") and " pid " in line and " since " in line
    # Nothing half-written: no marker left, no object, no manifest, no channel moved.
    assert store.list("datasets/") == [GC_LOCK_KEY]
    lock.release()
    assert not store.exists(GC_LOCK_KEY)
    for bad in ("-1", "nan"):
        assert protein_main(["datasets", "push", "--data", str(data), "--store", s3_bucket,
                             "--wait-for-gc-minutes", bad]) == 2
        [line] = error_lines(capsys.readouterr().err)
        assert line.startswith("protein datasets: error: --wait-for-gc-minutes must be a number of minutes >= 0")


def test_stale_push_markers_are_removed_and_abandoned_locks_taken_over(data: Path, s3_bucket: str) -> None:
    store = open_store(s3_bucket)
    # The gcs below may work for 2.9 s before their own bound stops them (a loaded machine plans slowly).
    short = replace(FAST, marker_stale_s=1.5, lock_abandoned_s=3.0, margin_s=0.1)
    _, objects = orphaned(store, data)
    # Left by a push and a gc that were killed: a marker and the lock, never removed.
    dead_marker = f"{PUSHES_PREFIX}dead.json"
    store.put_bytes(dead_marker, b'{"host": "gone", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}',
                    if_none_match=True)
    dead_gc = GcLock.acquire(store, short)
    time.sleep(3.5)  # both past their bounds, on the store's clock
    # A push proceeds past the abandoned lock (no wait), and its own marker is live for the gc below.
    busy = r"deleted no content object: 1 push\(es\) in progress: .*pushes/[0-9a-f]{32}\.json \(host "
    with coordination.PushMarker(store, short), pytest.raises(StoreBusy, match=busy):
        collect_orphans(store, 0, times=short)
    assert store.list(PUSHES_PREFIX) == []  # the stale one removed by gc, the live one by its push
    outcome = collect_orphans(store, 0, times=short)
    assert (outcome["deleted"], outcome["stale_push_markers_removed"]) == (objects, 0)
    # The dead gc's lock was taken over (a compare-and-swap on its etag): when that gc wakes up it may
    # neither delete nor remove the lock of the gc that holds it now.
    holder = GcLock.acquire(store, short)
    with pytest.raises(StoreBusy, match=r"gc\.lock is no longer this gc's"):
        dead_gc.check_held()
    dead_gc.release()
    assert store.etag(GC_LOCK_KEY) == holder.etag
    holder.release()
    assert not store.exists(GC_LOCK_KEY)


def test_a_gc_near_its_lock_bound_stops_deleting(s3_bucket: str) -> None:
    store = open_store(s3_bucket)
    # Bounds wide enough for a loaded machine: the first check comes within 3 s of taking the lock.
    lock = GcLock.acquire(store, replace(FAST, lock_abandoned_s=6.0, margin_s=3.0))
    taken = time.monotonic()  # after the lock's own clock started: ``held`` is at least the time since
    lock.check_held()
    time.sleep(max(0.0, 3.1 - (time.monotonic() - taken)))
    with pytest.raises(StoreBusy, match=r"close to the 6 s after which pushes treat it as abandoned"):
        lock.check_held()
    lock.release()


def test_a_gc_paused_past_its_bound_stops_deleting_by_the_stores_clock(
        s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM paused by its hypervisor counts the pause on none of its clocks: the gc wakes within its
    bound by its own, but its lock is an hour old on the store's, and pushes take it for abandoned."""
    store = open_store(s3_bucket)
    lock = GcLock.acquire(store, FAST)
    lock.check_held()
    monkeypatch.setattr(coordination, "held_clock", lambda: lock._acquired_at)  # noqa: SLF001 (the clock stood still)
    real_clock = store.clock
    monkeypatch.setattr(store, "clock", lambda: real_clock() + FAST.lock_abandoned_s)
    with pytest.raises(StoreBusy, match=r"old on the store's clock, close to the 3600 s after which pushes"):
        lock.check_held()
    lock.release()


def test_a_second_gc_is_refused_while_the_first_runs(
        data: Path, s3_bucket: str, capsys: pytest.CaptureFixture[str],
        paused_gc_plan: tuple[threading.Event, threading.Event]) -> None:
    store = open_store(s3_bucket)
    _, objects = orphaned(store, data)
    planning, resume = paused_gc_plan
    first, collected = in_thread(lambda: collect_orphans(store, 0, times=FAST))
    assert planning.wait(WAIT_S)
    second = protein_main(["datasets", "gc", "--store", s3_bucket, "--older-than-hours", "0"])
    err = capsys.readouterr().err
    resume.set()
    first.join(WAIT_S)
    assert second == 9
    [line] = error_lines(err)
    assert line.startswith(f"protein datasets: error: another datasets gc holds {s3_bucket}/{GC_LOCK_KEY} (host ")
    assert " pid " in line and "; run gc again when it ends (a lock older than 1 h counts as abandoned)" in line
    assert "error" not in collected and collected["value"]["deleted"] == objects
    assert not store.exists(GC_LOCK_KEY)


def push_paused_past_its_marker_bound(data: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A push paused after its listing until its marker is stale on the store's clock: gc removes the
    marker and deletes the old orphans the push found. The push must notice, write a new marker, list
    again and upload what is gone, so its dataset is complete."""
    store = open_store(s3_bucket)
    short = replace(FAST, marker_stale_s=2.0, margin_s=0.5)
    fp, objects = orphaned(store, data)
    listed, gc_done = threading.Event(), threading.Event()
    listings: list[int] = []
    real_listing = push_module.stored_objects

    def listing_then_wait_for_gc(target: Store) -> dict[str, int]:
        present = real_listing(target)
        listings.append(len(present))
        if len(listings) == 1:
            listed.set()
            gc_done.wait(WAIT_S)
        return present

    monkeypatch.setattr(push_module, "stored_objects", listing_then_wait_for_gc)
    push, pushed = in_thread(lambda: push_dataset(str(data), store, times=short))
    assert listed.wait(WAIT_S)
    time.sleep(2.5)  # the push's marker is now stale on the store's clock
    try:
        outcome = collect_orphans(store, 0, times=short)
    finally:
        gc_done.set()
    push.join(WAIT_S)
    assert "error" not in pushed, pushed
    assert missing_objects(store, fp) == []
    assert (outcome["stale_push_markers_removed"], outcome["deleted"]) == (1, objects)
    assert listings == [objects, 0] and pushed["value"].uploaded == objects
    assert store.list(PUSHES_PREFIX) == []


def test_a_push_slower_than_the_marker_bound_renews_it_and_lists_again(
        data: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    push_paused_past_its_marker_bound(data, s3_bucket, monkeypatch)


def test_a_push_whose_clock_stood_still_finds_its_marker_gone_and_lists_again(
        data: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same pause on a host whose clock did not count it (a laptop suspended mid-push, a paused
    VM): by its own clock the marker is fresh, but gc removed it as stale by the store's."""
    monkeypatch.setattr(coordination, "held_clock", lambda: 0.0)
    push_paused_past_its_marker_bound(data, s3_bucket, monkeypatch)


def test_gc_checks_its_bound_before_every_delete_not_only_every_batch(data: Path, s3_bucket: str) -> None:
    """A batch is a hundred delete requests, each with the S3 client's timeouts and retries: a gc that
    reaches its bound inside one stops there, before a push takes its lock for abandoned."""
    store = open_store(s3_bucket)
    _, objects = orphaned(store, data)
    assert objects >= 3
    plan = dataset_gc.plan_objects_gc(store, 0)

    class LockRunningOut:
        """Held (its etag is its own) and within its bound for two more deletes."""

        checks = 0

        def check_held(self) -> None:
            pass

        def check_within_bound(self) -> None:
            self.checks += 1
            if self.checks > 2:
                raise StoreBusy("close to the bound")

    with pytest.raises(StoreBusy):
        dataset_gc.apply_objects_gc(store, plan, LockRunningOut())  # type: ignore[arg-type]
    assert len(store.list(f"{OBJECTS_PREFIX}/")) == objects - 2


def test_held_clock_counts_time_a_suspended_host_slept(monkeypatch: pytest.MonkeyPatch) -> None:
    """gc and push judge their bounds on CLOCK_BOOTTIME where the platform has it (Linux: time.monotonic
    does not count a suspend), on the monotonic clock where it does not."""
    assert getattr(time, "CLOCK_BOOTTIME", None) == coordination.BOOT_CLOCK
    boot_clock = 77  # a clock id of this test's own: both branches run on every platform
    real = time.clock_gettime
    monkeypatch.setattr(coordination, "BOOT_CLOCK", boot_clock)
    monkeypatch.setattr(coordination, "time", ModuleClock(
        clock_gettime=lambda clock: 1e9 if clock == boot_clock else real(clock), monotonic=lambda: 5.0))
    assert coordination.held_clock() == 1e9
    monkeypatch.setattr(coordination, "BOOT_CLOCK", None)
    assert coordination.held_clock() == 5.0


def test_the_push_log_counts_what_it_uploaded_before_a_renewal_as_uploaded(
        data: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Into an empty store, a push uploads every object, then finds its marker aged out, renews it and
    lists again: that listing shows the objects it just sent. Its log line still says it uploaded them
    all and found none already stored."""
    store = open_store(s3_bucket)
    checks: list[coordination.PushMarker] = []

    def stale_once(marker: coordination.PushMarker) -> bool:
        checks.append(marker)
        return len(checks) > 1

    monkeypatch.setattr(coordination.PushMarker, "fresh", stale_once)
    with caplog.at_level("INFO", logger=push_module.log.name):
        result = push_dataset(str(data), store)
    assert len(checks) == 2 and result.uploaded == len(store.list(f"{OBJECTS_PREFIX}/")) > 0
    pushed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pushed ")]
    expected = (f"{result.files} files, {result.uploaded} objects uploaded ({result.uploaded_bytes} bytes), "
                "0 already stored")
    assert len(pushed) == 1 and pushed[0].endswith(expected), pushed
