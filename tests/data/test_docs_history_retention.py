"""The Data Docs history is bounded: a validation keeps the newest $PROTEIN_DOCS_KEEP_RUNS runs in the
store, in its index and in the host's mirror, whatever the number of earlier runs
(protein/validation/history.py, `prune_history`)."""

from __future__ import annotations

import datetime as dt
import logging
import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from protein.cli import main
from protein.errors import StoreError
from protein.storage import open_store
from protein.storage.local import LocalStore
from protein.validation import ValidationConfig, ValidationReport, run_validation
from protein.validation.history import KEEP_RUNS_ENV, RunId, mirror_root, run_of, runs_beyond
from protein.validation.runner import PAGES_PREFIX, RESULTS_PREFIX
from tests.data.corpus import SIZE, write_base

CONFIG = ValidationConfig(image_size=SIZE, max_image_bytes=200_000)
HISTORY = (RESULTS_PREFIX, PAGES_PREFIX)
# The mirror's folder for each of the store's history prefixes (as the runner lays it out).
MIRROR_FOLDERS = {RESULTS_PREFIX: Path("results"), PAGES_PREFIX: Path("docs/validations")}
KEY_TIME = "%Y%m%dT%H%M%S.%fZ"  # GX's run time in keys


# A run's files, by prefix: {prefix: {path under the prefix: bytes}}, and the run they belong to.
Template = tuple[dict[str, dict[str, bytes]], RunId]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base(tmp_path_factory.mktemp("corpus") / "base")


@pytest.fixture(scope="module")
def template(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Template:
    """One real run's results and pages, to clone under other run times: GX reads them back as
    the history, so they must be what GX wrote."""
    store_uri = str(tmp_path_factory.mktemp("template") / "store")
    report = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path_factory.mktemp("template-report"))
    store = open_store(store_uri)
    run = current_run(report)
    files: dict[str, dict[str, bytes]] = {}
    for prefix in HISTORY:
        files[prefix] = {}
        for key in store.list(f"{prefix}/"):
            rel = key[len(prefix) + 1 :]
            if run_of(rel) == run:
                files[prefix][rel] = store.get_bytes(key)
    assert files[RESULTS_PREFIX] and files[PAGES_PREFIX]
    return files, run


def current_run(report: ValidationReport) -> RunId:
    run_time = dt.datetime.fromisoformat(report.statistics["run_time"]).strftime(KEY_TIME)
    return RunId(run_time=run_time, run_name=report.data_fingerprint)


def fake_runs(count: int) -> list[RunId]:
    """Earlier nightly runs, one a day in 2025. The names sort against the times, so a ranking by
    name (or by anything but the run time) keeps the wrong ones."""
    first = dt.datetime(2025, 1, 1, 2, 0, tzinfo=dt.UTC)
    return [RunId(run_time=(first + dt.timedelta(days=i)).strftime(KEY_TIME), run_name=f"night-{count - i:03d}")
            for i in range(count)]


def clone(template: Template, run: RunId) -> dict[str, dict[str, bytes]]:
    """The template run's files under `run`'s keys."""
    files, original = template
    old = f"/{original.run_name}/{original.run_time}/"
    new = f"/{run.run_name}/{run.run_time}/"
    return {prefix: {f"/{rel}".replace(old, new)[1:]: data for rel, data in by_rel.items()}
            for prefix, by_rel in files.items()}


def seed_store(store: LocalStore, template: Template, runs: Iterable[RunId]) -> None:
    for run in runs:
        for prefix, by_rel in clone(template, run).items():
            for rel, data in by_rel.items():
                store.put_bytes(f"{prefix}/{rel}", data)


def seed_mirror(mirror: Path, template: Template, runs: Iterable[RunId]) -> None:
    """As if this host had validated (or fetched) these runs before."""
    for run in runs:
        for prefix, by_rel in clone(template, run).items():
            for rel, data in by_rel.items():
                path = mirror / MIRROR_FOLDERS[prefix] / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)


def runs_in_store(store: LocalStore, prefix: str) -> set[RunId]:
    return {run for key in store.list(f"{prefix}/") if (run := run_of(key[len(prefix) + 1 :])) is not None}


def runs_in_mirror(mirror: Path, prefix: str) -> set[RunId]:
    folder = mirror / MIRROR_FOLDERS[prefix]
    return {run for path in folder.rglob("*") if path.is_file()
            if (run := run_of(path.relative_to(folder).as_posix())) is not None}


def runs_in_index(html: str) -> set[RunId]:
    """The runs the Data Docs index links to (each link, in its table's data: validations/<suite>/<run
    name>/<run time>/<batch>.html)."""
    return {run for link in re.findall(r"validations/([^\"'\s]+\.html)", html)
            if (run := run_of(link)) is not None}


# ---- which runs are the newest ------------------------------------------------------------------


def test_newest_means_the_run_time_in_the_key() -> None:
    # A run named to sort last but run first is the oldest; so is one uploaded last.
    early = run_of("labels/rows/zzzz/20250101T000000.000000Z/protein-labels.rows.json")
    late = run_of("drift/aaaa/20251231T235959.999999Z/protein-drift.html")
    assert early == RunId("20250101T000000.000000Z", "zzzz") and late == RunId("20251231T235959.999999Z", "aaaa")
    assert runs_beyond([late, early], keep=1) == {early}
    assert runs_beyond([late, early], keep=2) == set() and runs_beyond([late, early], keep=0) == {early, late}
    # Not a run's file: never pruned.
    assert run_of(".ge_store_backend_id") is None and run_of("index.html") is None
    assert run_of("drift/aaaa/not-a-time/protein-drift.json") is None


# ---- a validation prunes the store, the index and the mirror ------------------------------------


def test_a_validation_keeps_only_the_newest_runs_in_the_store_its_index_and_the_mirror(
        base: Path, tmp_path: Path, template: Template, monkeypatch: pytest.MonkeyPatch) -> None:
    keep = 3
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "host"))
    store_uri = str(tmp_path / "store")
    store = open_store(store_uri)
    earlier = fake_runs(7)
    shuffled = earlier[:]
    random.Random(7).shuffle(shuffled)  # upload order is not run order
    seed_store(store, template, shuffled)
    mirror = mirror_root(store)
    # This host mirrored every earlier run, and one more that another host has pruned from the store.
    pruned_elsewhere = RunId("20241231T020000.000000Z", "night-pruned")
    seed_mirror(mirror, template, [*earlier, pruned_elsewhere])

    monkeypatch.setenv(KEEP_RUNS_ENV, str(keep))
    report = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report")

    newest = {*earlier[-(keep - 1):], current_run(report)}
    assert len(newest) == keep
    for prefix in HISTORY:
        assert runs_in_store(store, prefix) == newest, prefix
        assert runs_in_mirror(mirror, prefix) == newest, prefix
    assert runs_in_index(store.get_bytes("validation/docs/index.html").decode()) == newest
    assert runs_in_index((tmp_path / "report" / "docs" / "index.html").read_text()) == newest
    # What is not a run's file stays; pruned runs leave no empty folders behind in the mirror.
    assert store.exists(f"{RESULTS_PREFIX}/.ge_store_backend_id")
    assert not [f for f in (mirror / "results").rglob("*") if f.is_dir() and not any(f.iterdir())]


def a_store_with_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: Template, count: int,
                      host: str) -> tuple[str, LocalStore, list[RunId]]:
    """A local store holding `count` earlier runs, and this host's cache folder (its mirror) set."""
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / host))
    store_uri = str(tmp_path / "store")
    store = open_store(store_uri)
    earlier = fake_runs(count)
    seed_store(store, template, earlier)
    return store_uri, store, earlier  # type: ignore[return-value]


def after_the_last_history_listing(monkeypatch: pytest.MonkeyPatch, action: Callable[[LocalStore], None]) -> None:
    """Run `action` (what another host does) once, right after the validation's last listing of
    the history (its pages), before it prunes or fetches anything."""
    real_list = LocalStore.list
    acted: list[bool] = []

    def listing(self: LocalStore, prefix: str = "") -> list[str]:
        keys = real_list(self, prefix)
        if prefix == f"{PAGES_PREFIX}/" and not acted:
            acted.append(True)
            action(self)
        return keys

    monkeypatch.setattr(LocalStore, "list", listing)


def delete_run(store: LocalStore, run: RunId) -> None:
    store.delete_keys([k for k in store.list("validation/") if f"/{run.run_time}/" in k])


def test_pruning_spares_what_a_concurrent_run_writes_after_the_listing(
        base: Path, tmp_path: Path, template: Template, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hosts validate at once: the other host's run lands between this run's listing and its
    deletes, and the other host has already deleted an old run this one is about to delete."""
    keep = 2
    store_uri, store, earlier = a_store_with_runs(tmp_path, monkeypatch, template, 5, host="host")
    concurrent = RunId(dt.datetime.now(dt.UTC).strftime(KEY_TIME), "other-host")

    def other_host_validates_and_prunes(store: LocalStore) -> None:  # before this run prunes
        seed_store(store, template, [concurrent])
        delete_run(store, earlier[0])

    after_the_last_history_listing(monkeypatch, other_host_validates_and_prunes)
    monkeypatch.setenv(KEEP_RUNS_ENV, str(keep))
    report = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report")

    # This run kept the newest one of what it listed; the other host's run is untouched.
    for prefix in HISTORY:
        assert runs_in_store(store, prefix) == {earlier[-1], concurrent, current_run(report)}, prefix
    assert len(clone(template, concurrent)[RESULTS_PREFIX]) == len(
        [k for k in store.list(f"{RESULTS_PREFIX}/") if f"/{concurrent.run_time}/" in k])


def test_a_history_file_another_host_pruned_after_the_listing_is_skipped(
        base: Path, tmp_path: Path, template: Template, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with an empty mirror lists the history, then another host prunes a run before this one
    fetches it: the run is left out of this run's site, and the validation goes on."""
    store_uri, store, earlier = a_store_with_runs(tmp_path, monkeypatch, template, 3, host="new-host")
    after_the_last_history_listing(monkeypatch, lambda store: delete_run(store, earlier[0]))  # before it fetches
    report = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report")

    assert report.success, report.summary_lines()
    shown = runs_in_index((tmp_path / "report" / "docs" / "index.html").read_text())
    assert shown == {*earlier[1:], current_run(report)}
    assert earlier[0] not in runs_in_store(store, RESULTS_PREFIX) | runs_in_store(store, PAGES_PREFIX)


def test_a_role_refused_deletes_still_validates_over_the_newest_runs_only(
        base: Path, tmp_path: Path, template: Template, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A role that may not delete there (an older orchestrator policy than deployments/iam/'s): the
    store keeps the old runs, but the run is not failed for it and its site still shows only the newest."""
    keep = 3
    store_uri, store, earlier = a_store_with_runs(tmp_path, monkeypatch, template, 5, host="host")

    def refused(self: LocalStore, keys: list[str]) -> int:
        raise StoreError(f"{keys[0]}: access denied: s3:DeleteObject was refused")

    monkeypatch.setattr(LocalStore, "delete_keys", refused)
    monkeypatch.setenv(KEEP_RUNS_ENV, str(keep))
    with caplog.at_level(logging.WARNING, logger="protein.validation.history"):
        report = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report")

    assert report.success, report.summary_lines()
    newest = {*earlier[-(keep - 1):], current_run(report)}
    assert runs_in_index(store.get_bytes("validation/docs/index.html").decode()) == newest
    assert runs_in_store(store, RESULTS_PREFIX) == {*earlier, current_run(report)}
    warned = [r.getMessage() for r in caplog.records if "could not remove 3 runs" in r.getMessage()]
    assert len(warned) == 1 and "access denied" in warned[0], caplog.text


# ---- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-3", "ninety", "2.5"])
def test_a_bad_keep_runs_setting_is_refused_in_one_line(base: Path, tmp_path: Path, value: str,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv(KEEP_RUNS_ENV, value)
    code = main(["validate", "--image-size", str(SIZE), "--data", str(base), "--headers-only",
                 "--store", str(tmp_path / "store"), "--report", str(tmp_path / "report")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if KEEP_RUNS_ENV in line]
    assert len(lines) == 1 and lines[0].startswith(f"protein validate: error: {KEEP_RUNS_ENV} "), err
    assert repr(value) in lines[0] and "Traceback" not in err
    # Refused before anything was written.
    assert not (tmp_path / "store").exists() and not (tmp_path / "report").exists()
