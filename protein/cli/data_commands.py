"""Verbs about datasets: synth, validate, datasets push/list/gc/remove, cache gc."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from protein.cli.output import emit, progress_bar


def pipeline_event(helper: str, **fields: Any) -> bool:
    """Emit a Prefect event (e.g. ``pipeline_event("dataset_pushed", uri=..., ...)``) through
    ``tasks.events``, imported here at call time by name: the ``protein`` library never imports
    Prefect, and a verb that emits still runs offline (the helper does nothing without an API)."""
    events = importlib.import_module("tasks.events")
    return bool(getattr(events, helper)(**fields))


def cmd_synth(args: argparse.Namespace) -> int:
    from protein.config import SynthConfig
    from protein.synth import generate_dataset

    config = SynthConfig(train=args.train, test=args.test, size=args.size, seed=args.seed,
                         label_noise=args.label_noise, workers=args.workers)
    with progress_bar(args.train + args.test, "synth") as update:
        summary = generate_dataset(config, Path(args.out), Path(args.truth) if args.truth else None, update)
    emit({"out": str(summary.out), "truth": str(summary.truth), "train": summary.train, "test": summary.test,
          "seconds": round(summary.seconds, 2)})
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from protein.validation import ValidationConfig, run_validation

    config = ValidationConfig(image_size=args.image_size, check_pixels=not args.headers_only,
                              drift_alpha=args.drift_alpha, drift_min_relative_change=args.drift_min_relative_change,
                              drift_min_absolute_change=args.drift_min_absolute_change,
                              drift_action=args.drift_action, max_image_bytes=args.max_image_bytes)
    report_dir = Path(args.report) if args.report else None
    report = run_validation(args.data, config, store_uri=args.store, report_dir=report_dir, accept=args.accept)
    # Warnings are named, not just counted: which check, which files (duplicates, blank images...).
    emit({"success": report.success, "data_fingerprint": report.data_fingerprint, "failures": len(report.failures),
          "warnings": len(report.warnings),
          "warning_checks": [f"{w['suite']}: {w['message']} ({w.get('unexpected_count', 0):,})"
                             for w in report.warnings],
          "skipped_checks": report.skipped, "report_uri": report.report_uri, "docs_uri": report.docs_uri,
          "docs_path": report.docs_path, "reference": report.reference, "seconds": round(report.seconds, 2)})
    for line in report.summary_lines() + report.warning_lines():
        print(line, file=sys.stderr)
    for check in report.skipped:
        print(f"not checked: {check}", file=sys.stderr)
    return 0 if report.success else 1


def cmd_datasets(args: argparse.Namespace) -> int:
    from protein.data.push import list_datasets, push_dataset
    from protein.storage import open_store

    store = open_store(args.store)
    if args.datasets_cmd == "push":
        import dataclasses

        from protein.data.gc_coordination import DEFAULT_TIMES

        if not 0 <= args.wait_for_gc_minutes < float("inf"):  # NaN too: it would never stop waiting
            raise ValueError(f"--wait-for-gc-minutes must be a number of minutes >= 0, "
                             f"got {args.wait_for_gc_minutes:g}")
        times = dataclasses.replace(DEFAULT_TIMES, push_wait_s=args.wait_for_gc_minutes * 60)
        store.check()
        moved: list[Any] = []
        with progress_bar(None, "push") as pushed:
            # The channel moves only once the dataset is complete, and while the push marker still keeps
            # `datasets remove` away (it refuses a channel's head). The event carries the same id as the
            # channel entry, so a run started by it can tell whether a newer push superseded it.
            result = push_dataset(args.data, store, args.cache_dir, pushed, times, on_complete=lambda done: (
                moved.append(move_channel(store, args.channel, done.uri, done.fingerprint))))
        entry = moved[0]
        emit({"uri": result.uri, "fingerprint": result.fingerprint, "files": result.files, "bytes": result.bytes,
              "uploaded": result.uploaded, "uploaded_bytes": result.uploaded_bytes,
              "already_pushed": result.already_pushed, "channel": args.channel,
              "sequence": entry.sequence, "event_id": entry.event_id})
        # Starts retrain/nightly through its deployment trigger (when a Prefect API is configured).
        # Also on a re-push: the triggered run skips data the champion was trained on (the trigger's
        # skip_if_unchanged), so a re-push retrains only data the champion does not have.
        pipeline_event("dataset_pushed", uri=result.uri, fingerprint=result.fingerprint,
                       counts={"files": result.files, "bytes": result.bytes, "uploaded": result.uploaded},
                       channel=args.channel, sequence=entry.sequence, event_id=entry.event_id)
    elif args.datasets_cmd == "gc":
        from protein.data.dataset_gc import collect_orphans

        result_gc = collect_orphans(store, args.older_than_hours * 3600, dry_run=args.dry_run)
        emit({**result_gc, "dry_run": args.dry_run, "store": store.uri})
    elif args.datasets_cmd == "remove":
        from protein.data.dataset_removal import remove_dataset

        models_stores = [open_store(uri) for uri in args.models_store] if args.models_store else None
        emit({**remove_dataset(store, args.fingerprint, yes=args.yes, models_stores=models_stores), "store": store.uri})
    elif args.datasets_cmd == "list" and args.channel:
        list_channel(store, args.channel, args.json)
    elif args.datasets_cmd == "list":
        rows, incomplete = list_datasets(store)
        if args.json:
            emit(rows)
        else:
            for row in rows:
                print(f"{row['uri']}  {row['created']}  train={row['train_images']} test={row['test_images']}  "
                      f"{(row['bytes'] or 0) / 1e6:.1f} MB")
            if not rows:
                print(f"no datasets in {store.uri}", file=sys.stderr)
        for prefix in incomplete:
            print(f"incomplete push (no manifest, not usable): {store.uri.rstrip('/')}/{prefix}", file=sys.stderr)
    return 0


def move_channel(store: Any, channel: str, uri: str, fingerprint: str) -> Any:
    import uuid

    from protein.data.channels import advance_channel
    from protein.registry import default_actor, utc_now

    return advance_channel(store, channel, uri, fingerprint, str(uuid.uuid4()), default_actor(), utc_now())


def list_channel(store: Any, channel: str, as_json: bool) -> None:
    """A channel's pushes, newest first: which dataset each moved the channel to, when, by whom."""
    from protein.data.channels import read_channel

    history = list(reversed(read_channel(store, channel).history))
    if as_json:
        emit([entry.to_dict() for entry in history])
        return
    for entry in history:
        head = "  (head)" if entry is history[0] else ""
        print(f"{channel} #{entry.sequence}  {entry.pushed_at}  {entry.uri}  by {entry.actor}  event {entry.event_id}"
              f"{head}")
    if not history:
        print(f"no push on channel {channel!r} in {store.uri}", file=sys.stderr)


def cmd_cache(args: argparse.Namespace) -> int:
    from protein.cache import ImageCache

    result: dict[str, Any] = {"local": ImageCache(args.cache_dir).gc(args.older_than_days, args.dry_run),
                              "cache_dir": str(args.cache_dir), "deleted": not args.dry_run}
    if args.store:
        from protein.storage import open_store

        store = open_store(args.store)
        result.update(shared=ImageCache.gc_store(store, args.older_than_days, args.dry_run), store=store.uri)
    emit(result)
    return 0
