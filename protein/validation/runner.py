"""Entry points: validate a dataset, write its report, keep Data Docs in the store.

`run_validation` writes report.json and a Data Docs site locally and, with a store, uploads the
report under validation/<fingerprint>/ and the site under validation/docs/ (one site for every
run: this run's results are added to those of the newest earlier runs, which live in the store
under validation/results/; older runs are pruned, $PROTEIN_DOCS_KEEP_RUNS). The store's
report.json is written after the docs and before the reference moves; the report folder is filled
last, so a store failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from protein.atomic import write_text_atomic
from protein.data import SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_CSV, TRAIN_DIR, fingerprint, open_dataset
from protein.errors import DataError
from protein.labels import parse_label_set
from protein.validation import suites
from protein.validation.checkpoint import GX_DOCS, GX_RESULTS, run_checkpoint
from protein.validation.config import PIXEL_CHECKS, ValidationConfig
from protein.validation.drift import (
    IMAGE_STATISTICS,
    PIXEL_PROFILE_KEYS,
    canonical_label,
    check_profile,
    moments,
    profile_hash,
    profile_labels,
    row_hash,
)
from protein.validation.history import (
    ALL_RESULTS,
    RUN_PAGES,
    keep_runs_setting,
    mirror_root,
    prune_history,
    sync_down,
    upload_new,
)
from protein.validation.images import ImageReader, inspect_images, integrity_records
from protein.validation.reference import (
    STORE_PREFIX,
    load_reference,
    report_key,
    save_reference,
    stored_pixel_profile,
)
from protein.validation.report import ValidationReport

log = logging.getLogger(__name__)

# Written inside the docs/ this command puts in a report folder: a later run may replace that docs/
# and the report.json beside it, and nothing else (`--report .` in a checkout once wiped its docs/).
REPORT_MARKER = ".protein-report"

# Under these, a file that exists in the store is an earlier run's and is not uploaded again.
DOCS_PREFIX = f"{STORE_PREFIX}/docs"
RESULTS_PREFIX = f"{STORE_PREFIX}/results"
PAGES_PREFIX = f"{DOCS_PREFIX}/validations"  # the docs' per-run pages


def validate_dataset(
    path: str | os.PathLike[str],
    config: ValidationConfig = ValidationConfig(),
    reference_profile: dict | None = None,
) -> ValidationReport:
    """Validate a dataset folder or zip. Bad data gives success=False, never an exception;
    DataError only when the path is not a dataset at all."""
    if reference_profile is not None:
        reference_profile = {**check_profile(reference_profile, "reference_profile"),
                             "hash": profile_hash(reference_profile)}
    project = Path(tempfile.mkdtemp(prefix="protein-gx-"))
    try:
        return _validate(path, config, reference_profile or load_reference(None), project, docs=False)
    finally:
        shutil.rmtree(project, ignore_errors=True)


def _validate(path: str | os.PathLike[str], config: ValidationConfig, reference: dict,
              project_dir: Path, docs: bool) -> ValidationReport:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    source = open_dataset(path)
    tick = time.perf_counter()
    data_fingerprint = fingerprint(source)
    timings["fingerprint"] = time.perf_counter() - tick

    tick = time.perf_counter()
    tables: list[suites.Table] = []
    readable: list[tuple[str, str | None]] = []
    has_train_csv = source.exists(TRAIN_CSV)
    tables.append(suites.required_table(has_train_csv))
    train_csv: suites.Csv | None = None
    if has_train_csv:
        train_csv, problem = suites.read_csv(source, TRAIN_CSV)
        readable.append((TRAIN_CSV, problem))
    if train_csv is not None:
        tables += suites.labels_tables(train_csv, config)
    train_listed = suites.listed_ids(train_csv)
    train_present = source.list_dir(TRAIN_DIR)
    tables.append(suites.train_files_table(train_listed, train_present))
    test_present = source.list_dir(TEST_DIR)
    test_listed: list[tuple[int, str]] = []
    if source.exists(SAMPLE_SUBMISSION_CSV):
        sample, problem = suites.read_csv(source, SAMPLE_SUBMISSION_CSV)
        readable.append((SAMPLE_SUBMISSION_CSV, problem))
        if sample is not None:
            tables += suites.sample_tables(sample, test_present)
            test_listed = suites.listed_ids(sample)
    elif test_present:
        tables.append(suites.test_files_table([], test_present))
    if readable:
        tables.append(suites.readable_table(readable))
    timings["tables"] = time.perf_counter() - tick

    tick = time.perf_counter()
    train_names, test_names = set(train_present), set(test_present)
    jobs = [("train", row, i, f"{TRAIN_DIR}/{i}.png") for row, i in train_listed if f"{i}.png" in train_names]
    jobs += [("test", row, i, f"{TEST_DIR}/{i}.png") for row, i in test_listed if f"{i}.png" in test_names]
    records, workers = inspect_images(ImageReader(source, config.check_pixels, config.max_image_bytes), jobs)
    if records:
        tables.append(suites.images_table(records, config))
        tables.append(suites.integrity_table(integrity_records(records), config))
    timings["images"] = time.perf_counter() - tick

    labelled = _labelled_rows(train_csv)
    label_sets = [s for _, _, s in labelled]
    profile = profile_labels(label_sets)
    skipped = list(PIXEL_CHECKS) if not config.check_pixels else []
    row_hashes: list[str] = []
    if config.check_pixels:
        row_hashes, image_statistics = _pixel_profile(labelled, records)
        profile.update(row_hashes=sorted(set(row_hashes)), image_statistics=image_statistics)
    if labelled:
        known = reference.get("row_hashes")
        new_rows = config.check_pixels and isinstance(known, list)
        if config.check_pixels and not new_rows:
            skipped.append("label drift of the rows added since the reference (the reference lists no rows: "
                           "it is the built-in profile or was set before rows were recorded)")
        known_set = set(known) if new_rows else set()
        drift_rows = [{"row": row, "Image": image_id, "Label": canonical_label(label_set),
                       "new": bool(row_hashes) and row_hashes[i] not in known_set}
                      for i, (row, image_id, label_set) in enumerate(labelled)]
        tables.append(suites.drift_table(drift_rows, reference, config, new_rows))
    if config.check_pixels and records:
        if not isinstance(reference.get("image_statistics"), dict):
            skipped.append("image statistics drift (the reference has no image statistics: it is the built-in "
                           "profile or was set before they were recorded)")
        tables.append(suites.image_statistics_table(records, reference, config))

    tick = time.perf_counter()
    outcome = run_checkpoint(tables, data_fingerprint, project_dir, docs)
    timings["great_expectations"] = time.perf_counter() - tick

    statistics: dict[str, Any] = {
        "train_rows": len(train_csv.rows) if train_csv is not None else 0,
        "label_sets_profiled": len(label_sets),
        "train_files": len(train_present),
        "test_rows": len(test_listed),
        "test_files": len(test_present),
        "images_checked": len(records),
        "image_bytes_read": int(sum(r["bytes"] or 0 for r in records if r["decodes"] is not None))
        if config.check_pixels else None,
        "pixel_check": "full decode" if config.check_pixels else "header and IEND trailer only",
        "content_hashes": sum(1 for r in records if r["content_sha256"]),
        "image_workers": workers,
        "skipped_checks": skipped,
        **outcome.statistics,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    report = ValidationReport(
        success=outcome.success, data_fingerprint=data_fingerprint, dataset=source.description,
        failures=outcome.failures, warnings=outcome.warnings, profile=profile, statistics=statistics,
        seconds=round(time.perf_counter() - started, 3),
        reference={k: reference.get(k) for k in ("source", "n", "hash", "uri", "model_id", "data_fingerprint")},
        suites=outcome.suites, skipped=skipped,
    )
    for line in report.summary_lines():
        log.info("validation failure: %s", line)
    return report


def _labelled_rows(train_csv: suites.Csv | None) -> list[tuple[int, str, frozenset[int]]]:
    """(CSV line, Image id, label set) of every row with a usable label."""
    if train_csv is None:
        return []
    out = []
    ids = train_csv.column("Image") or [None] * len(train_csv.rows)
    for row, image_id, label in zip(train_csv.rows, ids, train_csv.column("Label"), strict=False):
        try:
            out.append((row, str(image_id), parse_label_set(label)))
        except ValueError:
            continue  # already a failed expectation; the profile counts only usable rows
    return out


def _pixel_profile(labelled: list[tuple[int, str, frozenset[int]]],
                   records: list[dict]) -> tuple[list[str], dict | None]:
    """What only the decoded pixels give the profile: a hash per labelled row (id, labels, pixels;
    "rows added since the reference" are those whose hash the reference lacks) and the moments of
    each per-image intensity statistic over the decoded train images."""
    content = {r["Image"]: r["content_sha256"] for r in records if r["split"] == "train" and r["content_sha256"]}
    hashes = [row_hash(image_id, label_set, content.get(image_id, "")) for _, image_id, label_set in labelled]
    decoded = [r for r in records if r["split"] == "train" and r.get(IMAGE_STATISTICS[0]) is not None]
    stats = {name: moments([r[name] for r in decoded]) for name in IMAGE_STATISTICS} if decoded else None
    return hashes, stats


def run_validation(
    path: str | os.PathLike[str],
    config: ValidationConfig = ValidationConfig(),
    store_uri: str | None = None,
    report_dir: Path | None = None,
    accept: bool = False,
) -> ValidationReport:
    """Validate; write report.json and Data Docs into report_dir (default: a new temp dir); with a
    store, measure drift against its reference profile and upload report and docs. `accept`
    makes this dataset's profile the reference, if it passed."""
    from protein.links import object_uri
    from protein.storage import open_store

    open_dataset(path)  # not a dataset at all: DataError before anything is written
    keep_runs = keep_runs_setting()  # a bad setting, too
    if report_dir is not None:
        check_report_dir(Path(report_dir))
    store = open_store(store_uri) if store_uri else None
    reference = load_reference(store)
    # Absolute: Great Expectations refuses a project folder given relative to the working folder.
    out = Path(report_dir).resolve() if report_dir is not None else Path(tempfile.mkdtemp(prefix="protein-validation-"))
    out.mkdir(parents=True, exist_ok=True)
    project = Path(tempfile.mkdtemp(prefix=".gx-", dir=out))
    try:
        if store is not None:
            # Earlier runs: their results (what the index lists) and their pages (GX lists a run in
            # the index only if the site already holds its page), through this host's mirror. Only
            # the newest keep_runs - 1 (this run makes keep_runs): the rest are pruned first, so
            # listing, copying and the index stay bounded however many nights have run.
            mirror = mirror_root(store)
            mirrors = {RESULTS_PREFIX: mirror / "results", PAGES_PREFIX: mirror / "docs" / "validations"}
            kept = prune_history(store, {prefix: set(store.list(f"{prefix}/")) for prefix in mirrors}, mirrors,
                                 keep=keep_runs - 1)
            results_keys, _ = sync_down(store, RESULTS_PREFIX, kept[RESULTS_PREFIX], mirrors[RESULTS_PREFIX],
                                        project / GX_RESULTS)
            pages_keys, _ = sync_down(store, PAGES_PREFIX, kept[PAGES_PREFIX], mirrors[PAGES_PREFIX],
                                      project / GX_DOCS / "validations")
        report = _validate(path, config, reference, project, docs=True)
        staged_docs = project / GX_DOCS
        if store is not None:
            # The store first, report.json last in it: a store failure (StoreError, exit 3) leaves no
            # report in the store and nothing new in the report folder; report.json is the commit.
            upload_new(store, project / GX_RESULTS, RESULTS_PREFIX, results_keys, ALL_RESULTS, mirror / "results")
            upload_new(store, staged_docs, DOCS_PREFIX, pages_keys, RUN_PAGES, mirror / "docs")
            # Durable URIs, never presigned URLs: this report ends up in Prefect's database.
            report.docs_uri = object_uri(store, f"{DOCS_PREFIX}/index.html")
            report.report_uri = object_uri(store, report_key(report.data_fingerprint))
            keep_pixel_profile(store, report)
            _put_report(store, report)
            if accept:
                if not report.success:
                    log.warning("not accepting %s as the reference: it failed validation", report.data_fingerprint)
                else:
                    # Only now that its report is stored may the dataset become the reference.
                    report.reference = {**report.reference, "accepted": save_reference(
                        store, report.profile, source=f"accepted dataset {report.data_fingerprint}",
                        data_fingerprint=report.data_fingerprint, dataset=report.dataset)}
                    _put_report(store, report)
        docs = out / "docs"
        (staged_docs / REPORT_MARKER).write_text("written by protein validate: the next run into this "
                                                 "folder replaces docs/ and report.json\n")
        _replace_dir(staged_docs, docs)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    report.docs_path = str(docs / "index.html")
    write_text_atomic(out / "report.json", _report_text(report))
    log.info("validation %s for %s (%s): report %s", "passed" if report.success else "FAILED",
             report.dataset, report.data_fingerprint, report.report_uri or out / "report.json")
    return report


def check_report_dir(report_dir: Path) -> None:
    """DataError unless `report_dir` can take this run's docs/ and report.json without losing
    anything this command did not write there."""
    if report_dir.exists() and not report_dir.is_dir():
        raise DataError(f"--report {report_dir}: exists and is not a folder (report.json and docs/ go in a folder)")
    ours = (report_dir / "docs" / REPORT_MARKER).is_file()
    for name in ("docs", "report.json"):
        taken = report_dir / name
        if (taken.exists() or taken.is_symlink()) and not ours:
            raise DataError(f"--report {report_dir}: {taken} exists and was not written by protein validate "
                            "(expected a new or empty folder, or one an earlier validate wrote)")


def _report_text(report: ValidationReport) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str)


def keep_pixel_profile(store: Any, report: ValidationReport) -> None:
    """A run that decoded no pixel (--headers-only) knows no row hashes or image statistics; an
    earlier run on the same data (the same fingerprint: the same images) did. They are kept in the
    report this run writes: a promotion builds the drift reference from them, and overwritten by a
    headers-only trial run, the new-rows and image-statistics drift checks went quiet."""
    missing = [k for k in PIXEL_PROFILE_KEYS if report.profile.get(k) is None]
    if missing and (earlier := stored_pixel_profile(store, report.data_fingerprint)):
        report.profile.update({k: earlier[k] for k in missing if k in earlier})


def _put_report(store: Any, report: ValidationReport) -> None:
    store.put_bytes(report_key(report.data_fingerprint), _report_text(report).encode(),
                    content_type="application/json")


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder into place: readers see the old docs or the new, never a mix."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


