"""`protein` command line: synth, validate, train, evaluate, predict, models, datasets.

Every verb prints its result as JSON on stdout (the last line, for train) and reports
failures as one line on stderr with a specific exit code: 1 data failed validation,
2 bad input or usage, 3 object store, 4 registry, 5 promotion conflict, 7 a training rank died
(`train --nproc`; rerun with the same --run-id to resume).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from protein.config import RECIPES, TrainConfig, recipe_config

log = logging.getLogger("protein")

DATA_HELP = ("dataset: a folder or the competition zip (flat, or Kaggle's 'Human protein atlas/' layout), "
             "s3://bucket/prefix/ or s3://bucket/key.zip")


def emit(payload: Any) -> None:
    print(json.dumps(payload, default=str))


@contextmanager
def progress_bar(total: int | None, desc: str):  # noqa: ANN201
    """A progress bar on stderr for interactive terminals; silent in pipes and CI logs."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False) as bar:
        yield bar.update


# --- verbs -----------------------------------------------------------------------------------
def pipeline_event(helper: str, **fields: Any) -> bool:
    """Emit a Prefect event (e.g. ``pipeline_event("dataset_pushed", uri=..., ...)``) through
    ``tasks.events``, imported here at call time by name: the ``protein`` library never imports
    Prefect, and a verb that emits still runs offline (the helper does nothing without an API)."""
    events = importlib.import_module("tasks.events")
    return bool(getattr(events, helper)(**fields))


def cmd_link(args: argparse.Namespace) -> int:
    from protein.links import shareable_url

    print(shareable_url(args.uri, expires_s=int(args.hours * 3600)))
    return 0


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


def parse_fold(text: str | None) -> tuple[int | None, int | None]:
    """'i/K' -> (i, K), 1 <= i <= K."""
    if text is None:
        return None, None
    try:
        fold, folds = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--fold expects i/K (e.g. 1/5 for the first of 5 folds), got {text!r}") from None
    return fold, folds


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe's config with every option given on the command line on top."""
    fold, folds = parse_fold(args.fold)
    return recipe_config(args.recipe, arch=args.arch, epochs=args.epochs, image_size=args.image_size,
                         batch_size=args.batch_size, accumulate=args.accumulate, seed=args.seed, lr=args.lr,
                         weight_decay=args.weight_decay,
                         loss=args.loss, holdout_fraction=args.holdout, weights=args.weights, device=args.device,
                         compile=args.compile or None, jitter=args.jitter, ema_decay=args.ema_decay, tta=args.tta,
                         fold=fold, folds=folds, refit=bool(args.thresholds_from) or None,
                         thresholds_from=tuple(args.thresholds_from) if args.thresholds_from else None,
                         threshold_metric=args.threshold_metric)


def cmd_archs(args: argparse.Namespace) -> int:
    from protein.model import architectures

    emit(list(architectures()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from protein import distributed
    from protein.pipeline import train_and_register, train_on_ranks

    config = train_config_from_args(args)
    rank = distributed.current()
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc is not None and args.nproc > 1 and not rank.distributed:
        # This process only prepares (decode cache, run id) and launches the ranks.
        with progress_bar(None, "decode") as decoded:
            emit(train_on_ranks(args.nproc, args.data, args.store, config, args.run_id, args.cache_dir, decoded,
                                args.share_cache, args.expect_fingerprint))
        return 0

    def on_epoch(record: dict[str, Any]) -> None:
        holdout = record.get("holdout_f1_samples")  # absent for a refit on every row
        log.info("epoch %d/%d: train_loss %.4f holdout_f1_samples %s (%.1f img/s)", record["epoch"],
                 record["epochs"], record["train_loss"], "-" if holdout is None else f"{holdout:.4f}",
                 record["train_images_per_s"])

    with progress_bar(None, "decode") as decoded, progress_bar(None, "train") as trained:
        result = train_and_register(args.data, args.store, config, run_id=args.run_id, cache_dir=args.cache_dir,
                                    on_epoch=on_epoch, on_batch=trained, on_decode=decoded,
                                    share_cache=args.share_cache, expected_fingerprint=args.expect_fingerprint)
    if rank.is_main:  # started by torchrun directly: one result line, from rank 0
        emit(result)
    return 0


def cmd_train_job(args: argparse.Namespace) -> int:
    """One rank of a run launched by `train --nproc`: the job file holds the resolved config."""
    from protein import distributed
    from protein.config import from_dict
    from protein.pipeline import train_and_register

    job = json.loads(Path(args.job).read_text())
    config = from_dict(TrainConfig, job["config"])
    result = train_and_register(job["data"], job["store"], config, run_id=job["run_id"],
                                cache_dir=Path(job["cache_dir"]) if job["cache_dir"] else None,
                                expected_fingerprint=job.get("expected_fingerprint"))
    distributed.write_result(result)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from protein.pipeline import evaluate_version

    emit(evaluate_version(args.data, args.store, args.model, args.holdout, args.seed, args.cache_dir))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from protein.pipeline import predict_and_publish

    models = args.model[0] if len(args.model) == 1 else args.model
    emit(predict_and_publish(args.data, args.store, models, Path(args.out) if args.out else None, args.cache_dir))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from protein.validation import ValidationConfig, run_validation

    config = ValidationConfig(image_size=args.image_size, check_pixels=not args.headers_only,
                              drift_tolerance=args.drift_tolerance, drift_action=args.drift_action)
    report_dir = Path(args.report) if args.report else None
    report = run_validation(args.data, config, store_uri=args.store, report_dir=report_dir)
    emit({"success": report.success, "data_fingerprint": report.data_fingerprint, "failures": len(report.failures),
          "warnings": len(report.warnings), "report_uri": report.report_uri, "docs_uri": report.docs_uri,
          "docs_path": report.docs_path, "seconds": round(report.seconds, 2)})
    for line in report.summary_lines():
        print(line, file=sys.stderr)
    return 0 if report.success else 1


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
        state = registry.promote(args.model, reason=args.reason or "manual promotion")
        emit({"champion": state.champion, "history": len(state.history)})
    elif args.models_cmd == "rollback":
        state = registry.rollback(reason=args.reason or "manual rollback")
        emit({"champion": state.champion, "history": len(state.history)})
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
    plan = registry.plan_gc(older_than_s=args.older_than_hours * 3600, runs=args.runs,
                            run_age_s=args.run_age_days * 86400, keep_last=args.keep_last)
    # Complete versions are only deleted when asked twice: --keep-last names them, --yes deletes them.
    delete_versions = args.yes and not args.dry_run
    if not args.dry_run:
        registry.apply_gc(plan, delete_versions=delete_versions)
    stale = registry.store.clean_stale_uploads(older_than_s=args.older_than_hours * 3600, dry_run=args.dry_run)
    result: dict[str, Any] = {"orphans": sorted(plan.orphans), "stale_uploads": stale, "deleted": not args.dry_run}
    if args.runs:
        result["runs"] = sorted(plan.runs)
    if args.keep_last is not None:
        result["versions"] = plan.versions
        result["versions_deleted"] = delete_versions
        if plan.versions and not delete_versions:
            print(f"{len(plan.versions)} complete versions would be deleted; add --yes to delete them",
                  file=sys.stderr)
    emit(result)
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from protein.data.push import list_datasets, push_dataset
    from protein.storage import open_store

    store = open_store(args.store)
    if args.datasets_cmd == "push":
        store.check()
        with progress_bar(None, "push") as pushed:
            result = push_dataset(args.data, store, args.cache_dir, pushed)
        emit({"uri": result.uri, "fingerprint": result.fingerprint, "files": result.files, "bytes": result.bytes,
              "uploaded": result.uploaded, "already_pushed": result.already_pushed})
        # Starts retrain/nightly through its deployment trigger (when a Prefect API is configured).
        # Also on a re-push: the run skips unchanged data only when asked to, so re-pushing retrains.
        pipeline_event("dataset_pushed", uri=result.uri, fingerprint=result.fingerprint,
                       counts={"files": result.files, "bytes": result.bytes, "uploaded": result.uploaded})
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


# --- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from protein.pipeline import default_cache_dir, default_store_uri

    parser = argparse.ArgumentParser(prog="protein", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(func=func)
        return p

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", default=default_store_uri(),
                       help="object store: a local folder or s3://bucket/prefix (env PROTEIN_STORE)")

    def cache_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                       help="decoded-image cache folder (env PROTEIN_CACHE_DIR)")

    p = add("synth", cmd_synth, "write a synthetic dataset in the competition layout")
    p.add_argument("--out", required=True, help="dataset folder to create (must not exist or be empty)")
    p.add_argument("--train", type=int, default=200, help="number of train images")
    p.add_argument("--test", type=int, default=50, help="number of test images")
    p.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-noise", type=float, default=0.0, help="share of images whose recorded labels are perturbed")
    p.add_argument("--truth", help="hidden test labels CSV (default: OUT-test-labels.csv beside OUT)")
    p.add_argument("--workers", type=int, default=1, help="processes rendering images")

    p = add("validate", cmd_validate, "validate a dataset with Great Expectations (exit 1 if it fails)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    store_arg(p)
    p.add_argument("--report", help="folder for report.json and Data Docs HTML")
    p.add_argument("--image-size", type=int, default=512, help="expected width and height of every image")
    p.add_argument("--headers-only", action="store_true", help="skip the full-decode check (faster)")
    p.add_argument("--drift-tolerance", type=float, default=0.05, help="allowed absolute change in a class's share")
    p.add_argument("--drift-action", choices=("fail", "warn"), default="fail")

    p = add("train", cmd_train, "train a model and register it as a new version")
    p.add_argument("--data", required=True, help=DATA_HELP)
    store_arg(p)
    cache_arg(p)
    # Options default to None: the recipe supplies every value not given here.
    d = TrainConfig.__dataclass_fields__
    w = RECIPES["winner"]

    def opt(name: str, help_text: str = "", **kwargs: Any) -> None:
        field = name.lstrip("-").replace("-", "_")
        default = d[field].default if field in d else None
        shown = f"default {default}" + (f"; winner {w[field]}" if field in w else "")
        p.add_argument(name, default=None, help=f"{help_text} ({shown})".strip(), **kwargs)

    p.add_argument("--recipe", choices=tuple(RECIPES), default="default",
                   help="named starting point; 'winner': efficientnet_b1 at 512 px from ImageNet weights, "
                        "26 epochs, EMA, brightness/contrast jitter, 8-view TTA")
    opt("--arch", "any torchvision classification architecture (`protein archs` lists them)")
    opt("--epochs", type=int)
    opt("--image-size", "training resolution in pixels", type=int)
    opt("--batch-size", type=int)
    opt("--lr", "peak learning rate of the one-cycle schedule", type=float)
    opt("--weight-decay", "AdamW weight decay (never applied to norms and biases)", type=float)
    opt("--loss", choices=("bce", "focal"))
    p.add_argument("--holdout", type=float, default=None,
                   help=f"holdout share (default {TrainConfig.holdout_fraction})")
    opt("--seed", "split, initialisation and augmentation seed", type=int)
    opt("--weights", "'imagenet' (torchvision's file from $TORCH_HOME/hub/checkpoints, never downloaded) or a "
                     "local safetensors/state-dict file; none: from scratch")
    opt("--jitter", "per-image brightness/contrast factors in [1-j, 1+j]", type=float)
    opt("--ema-decay", "decay of the weights' moving average that is evaluated and saved; 0: off", type=float)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the 8 dihedral views in evaluation and prediction (default off; winner on)")
    p.add_argument("--fold", help="i/K: hold out fold i of K (1-based) of the stratified K-fold split")
    p.add_argument("--thresholds-from", nargs="+", metavar="MODEL",
                   help="refit on every row; thresholds tuned on these fold models' out-of-fold probabilities")
    opt("--threshold-metric", "metric the per-class thresholds maximise (the gate's)",
        choices=("f1_samples", "f1_micro", "f1_macro", "course_f_score"))
    opt("--device", "auto, cpu, cuda, cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--run-id", help="resume this run from its last checkpoint in the store, or start it")
    p.add_argument("--share-cache", action="store_true",
                   help="pull the decoded-image cache from the store if another worker built it, else push it")
    p.add_argument("--expect-fingerprint", metavar="FP",
                   help="refuse to train (exit 2) unless the data has this fingerprint (e.g. the validated one)")
    opt("--accumulate", "gradient accumulation: each --batch-size batch runs as this many micro-batches", type=int)
    p.add_argument("--nproc", type=int, default=None,
                   help="train on this many processes of this host (one per GPU; CPU: gloo) under torchrun; "
                        "--batch-size stays the global batch (docs/distributed.md)")

    p = add("train-job", cmd_train_job, "one rank of a `train --nproc` run (started by the launcher)")
    p.add_argument("job", help="job file written by the launcher")

    p = add("evaluate", cmd_evaluate, "score a model version on the dataset's holdout (JSON on stdout)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    store_arg(p)
    cache_arg(p)
    p.add_argument("--model", default="champion", help="version id or 'champion'")
    p.add_argument("--holdout", type=float, help="holdout share (default: the one the model was trained with)")
    p.add_argument("--seed", type=int, help="split seed (default: the one the model was trained with)")

    p = add("predict", cmd_predict, "predict the test set and write the submission")
    p.add_argument("--data", required=True, help=DATA_HELP)
    store_arg(p)
    cache_arg(p)
    p.add_argument("--model", nargs="+", default=["champion"],
                   help="version id or 'champion'; several: an ensemble (mean of their TTA probabilities)")
    p.add_argument("--out", help="also write the submission CSV to this local file")

    add("archs", cmd_archs, "list the architecture names --arch accepts (JSON)")

    p = add("link", cmd_link, "print a link to a stored object (presigned on S3) from its s3:// or file:// URI")
    p.add_argument("uri", help="s3://bucket/key or file:///path, as artifacts and reports record them")
    p.add_argument("--hours", type=float, default=24.0, help="how long an S3 link works (at most 168 = 7 days)")

    p = add("models", cmd_models, "list, show, promote, roll back and clean model versions")
    models = p.add_subparsers(dest="models_cmd", required=True)
    for name, help_text in (("list", "list versions; the champion is marked"), ("show", "print a version's model.json"),
                            ("promote", "make a version the champion"),
                            ("rollback", "return to the champion before the current one (walks back the history)"),
                            ("history", "print the registry's events: promotions and rollbacks, with who and when"),
                            ("reindex", "index the run id of versions registered before the run index existed"),
                            ("gc", "remove incomplete versions, stale uploads and, if asked, old runs and versions")):
        mp = models.add_parser(name, help=help_text, description=help_text,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        store_arg(mp)
        if name in ("list", "history"):
            mp.add_argument("--json", action="store_true", help="print a JSON array")
        if name == "history":
            mp.add_argument("--registrations", action="store_true",
                            help="also list each version's registration (one request per version)")
        if name in ("show", "promote"):
            mp.add_argument("model", help="version id" + (" or 'champion'" if name == "show" else ""))
        if name in ("promote", "rollback"):
            mp.add_argument("--reason", help="recorded in the champion history")
        if name == "gc":
            mp.add_argument("--dry-run", action="store_true", help="only list what would be removed")
            mp.add_argument("--older-than-hours", type=float, default=1.0,
                            help="remove incomplete versions and interrupted uploads only when older than this "
                                 "(a registration in progress is younger)")
            mp.add_argument("--runs", action="store_true",
                            help="also delete runs/<id>/ checkpoints of runs whose version is registered, and of "
                                 "unfinished runs older than --run-age-days")
            mp.add_argument("--run-age-days", type=float, default=7.0,
                            help="an unregistered run untouched this long counts as abandoned")
            mp.add_argument("--keep-last", type=int, metavar="N",
                            help="list complete versions beyond the newest N (never the champion or any version in "
                                 "its promotion history) for deletion")
            mp.add_argument("--yes", action="store_true", help="with --keep-last: really delete those versions")

    p = add("datasets", cmd_datasets, "push datasets to the object store and list them")
    datasets = p.add_subparsers(dest="datasets_cmd", required=True)
    dp = datasets.add_parser("push", help="upload a dataset to datasets/<fingerprint>/ and print its URI",
                             description="upload a dataset (any accepted layout) to datasets/<fingerprint>/ in the "
                             "store, written once and complete or invisible; prints its s3:// (or folder) URI",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dp.add_argument("--data", required=True, help=DATA_HELP)
    store_arg(dp)
    cache_arg(dp)
    dp = datasets.add_parser("list", help="list the complete datasets in the store",
                             description="list the complete datasets in the store (newest first)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    store_arg(dp)
    dp.add_argument("--json", action="store_true", help="print a JSON array")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from protein.errors import ProteinError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "great_expectations", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except ProteinError as exc:
        print(f"protein {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # config checks: bad option values are usage errors
        print(f"protein {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protein {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
