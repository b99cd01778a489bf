"""Verbs about registered model versions: evaluate, predict, models list/show/promote/rollback/history/gc."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from protein.cli.output import emit


def cmd_evaluate(args: argparse.Namespace) -> int:
    from protein.pipeline import evaluate_version

    emit(evaluate_version(args.data, args.store, args.model, args.holdout, args.seed, args.cache_dir))
    return 0


def check_out_file(text: str) -> Path:
    """``--out`` as a file path that can be created, checked before minutes of prediction (the folders
    it needs are created; a folder in its place, or a file where a folder must go, is refused)."""
    out = Path(text)
    if out.is_dir():
        raise ValueError(f"--out {text}: is a folder; expected the path of the submission CSV to write")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {text}: {parent} is not a folder; expected the path of a CSV file in one")
            break
    return out


def cmd_predict(args: argparse.Namespace) -> int:
    from protein.pipeline import predict_and_publish

    out = check_out_file(args.out) if args.out else None
    models = args.model[0] if len(args.model) == 1 else args.model
    emit(predict_and_publish(args.data, args.store, models, out, args.cache_dir))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from protein.registry import Registry
    from protein.storage import open_store

    store = open_store(args.store)
    registry = Registry(store)
    if args.models_cmd == "list":
        rows = registry.listing()
        if args.json:
            emit(rows)
        else:
            for row in rows:
                if "broken" in row:
                    print(f"! {row['id']}  BROKEN: {row['broken']}")
                    continue
                mark = "*" if row["champion"] else " "
                score = row["metrics"].get("f1_samples")
                score_text = f"{score:.4f}" if isinstance(score, float) else "-"
                print(f"{mark} {row['id']}  {row['created']}  {row['arch']}@{row['image_size']}px  "
                      f"f1_samples={score_text}")
            if not rows:
                print(f"no model versions in {store.uri}", file=sys.stderr)
    elif args.models_cmd == "show":
        emit(registry.spec(args.model))
    elif args.models_cmd == "promote":
        from protein.validation.reference import move_champion

        # The champion's training data is what later data is compared with: pointer and reference move
        # together, or neither does.
        target = registry.resolve(args.model)
        state, reference = move_champion(store, target, lambda: registry.promote(
            target, reason=args.reason or "manual promotion"))
        emit({"champion": state.champion, "history": len(state.history), "reference_profile": reference})
    elif args.models_cmd == "rollback":
        from protein.validation.reference import move_champion

        current = registry.champion()
        target = registry.rollback_target(current)
        state, reference = move_champion(store, target, lambda: registry.rollback(
            reason=args.reason or "manual rollback", expected_champion=current.champion))
        emit({"champion": state.champion, "history": len(state.history), "reference_profile": reference})
    elif args.models_cmd == "history":
        events = registry.history(registrations=args.registrations)
        if args.json:
            emit(events)
        else:
            for e in events:
                line = (f"{e.get('at')}  {e.get('action'):<8}  {e.get('model_id')}  "
                        f"(previous: {e.get('previous') or '-'})  by {e.get('actor') or '?'}  "
                        f"event {e.get('event_id') or '-'}  {e.get('reason') or ''}")
                print(line.rstrip())
            if not events:
                print(f"no registry events in {store.uri}", file=sys.stderr)
    elif args.models_cmd == "reindex":
        emit({"indexed": registry.reindex_runs()})
    elif args.models_cmd == "gc":
        return models_gc(args, registry)
    return 0


def models_gc(args: argparse.Namespace, registry: Any) -> int:
    from protein.registry.retention import check_age

    uploads_age_s = args.uploads_older_than_hours * 3600
    check_age("--uploads-older-than-hours", uploads_age_s, 3600)  # before anything is deleted
    plan = registry.plan_gc(older_than_s=args.older_than_hours * 3600, runs=args.runs,
                            run_age_s=args.run_age_days * 86400, keep_last=args.keep_last,
                            run_min_age_s=args.run_min_age_hours * 3600)
    # Complete versions are only deleted when asked twice: --keep-last names them, --yes deletes them.
    delete_versions = args.yes and not args.dry_run
    if not args.dry_run:
        registry.apply_gc(plan, delete_versions=delete_versions)
    stale = registry.store.clean_stale_uploads(older_than_s=uploads_age_s, dry_run=args.dry_run)
    result: dict[str, Any] = {"orphans": sorted(plan.orphans), "stale_uploads": stale, "deleted": not args.dry_run}
    if args.runs:
        result["runs"] = sorted(plan.runs)
        result["runs_kept"] = plan.kept
        result["abandoned_claims"] = sorted(plan.claims)
    if args.keep_last is not None:
        result["versions"] = plan.versions
        result["versions_deleted"] = delete_versions
        if plan.versions and not delete_versions:
            print(f"{len(plan.versions)} complete versions would be deleted; add --yes to delete them",
                  file=sys.stderr)
    emit(result)
    return 0
