"""The `protein` argument parser: every verb, its options and their defaults."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protein.cli.data_commands import cmd_cache, cmd_datasets, cmd_synth, cmd_validate
from protein.cli.model_commands import cmd_evaluate, cmd_models, cmd_predict
from protein.cli.output import cmd_link
from protein.cli.train_commands import cmd_archs, cmd_train, cmd_train_job
from protein.config import RECIPES, TrainConfig
from protein.data.channels import DEFAULT_CHANNEL, check_channel_name
from protein.errors import DataError
from protein.registry.retention import RUN_MIN_AGE_S, UPLOADS_MIN_AGE_S

DATA_HELP = ("dataset: a folder or the competition zip (flat, or Kaggle's 'Human protein atlas/' layout), "
             "s3://bucket/prefix/ or s3://bucket/key.zip")


def channel_name(text: str) -> str:
    try:
        return check_channel_name(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    from protein import cli  # imported here: the package imports this module first
    from protein.locations import default_cache_dir, default_store_uri

    # The package docstring (verbs and exit codes) is the top-level help.
    parser = argparse.ArgumentParser(prog="protein", description=cli.__doc__,
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
                       help="cache folder (env PROTEIN_CACHE_DIR; default: the per-user cache folder)")

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
    p.add_argument("--report", help="folder for report.json and Data Docs HTML in docs/; an earlier validate's "
                                    "output there is replaced; an existing file, or a docs/ or report.json it "
                                    "did not write, is refused (exit 2)")
    p.add_argument("--image-size", type=int, default=512, help="expected width and height of every image")
    p.add_argument("--headers-only", action="store_true",
                   help="read only each image's header and trailer (faster); skips the pixel decode, content "
                        "leakage, duplicate and blank-image checks, new-rows drift and image-statistics drift, "
                        "and the report lists them as not checked")
    from protein.validation.config import DEFAULT_MAX_IMAGE_BYTES, ValidationConfig

    vdefaults = ValidationConfig()
    p.add_argument("--drift-alpha", type=float, default=vdefaults.drift_alpha,
                   help="significance level of the label-drift test (false-alarm rate on undrifted data)")
    p.add_argument("--drift-min-relative-change", type=float, default=vdefaults.drift_min_relative_change,
                   help="smallest relative change of a label share that counts as drift (0.25 = a quarter)")
    p.add_argument("--drift-min-absolute-change", type=float, default=vdefaults.drift_min_absolute_change,
                   help="smallest change of a common label share (in share points, 0.05 = 5 points) that "
                        "counts as drift; rare shares use the relative floor, whichever is smaller")
    p.add_argument("--drift-action", choices=("fail", "warn"), default="fail")
    p.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES,
                   help="images larger than this are refused without being read")
    p.add_argument("--accept", action="store_true",
                   help="make this dataset's label profile the drift reference (only if it passes)")

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
    opt("--lr", "peak learning rate of the one-cycle schedule at --lr-reference-batch", type=float)
    opt("--lr-scaling", "how the peak lr follows the global batch: lr x (batch / reference) or its sqrt",
        choices=("none", "sqrt", "linear"))
    opt("--lr-reference-batch", "the global batch --lr is tuned for", type=int)
    opt("--weight-decay", "AdamW weight decay (never applied to norms and biases)", type=float)
    opt("--loss", choices=("bce", "focal"))
    p.add_argument("--holdout", type=float, default=None,
                   help=f"holdout share (default {TrainConfig.holdout_fraction})")
    opt("--seed", "split, initialisation and augmentation seed", type=int)
    opt("--weights", "'imagenet' (torchvision's file from $TORCH_HOME/hub/checkpoints, never downloaded) or a "
                     "local safetensors/state-dict file; none: from scratch")
    opt("--jitter", "per-image brightness/contrast factors in [1-j, 1+j]", type=float)
    opt("--ema-half-life-epochs", "the weights' moving average that is evaluated and saved: a step's weight halves "
        "after this many epochs, whatever the batch or GPU count; 0: off", type=float)
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average the 8 dihedral views in evaluation and prediction (default off; winner on)")
    p.add_argument("--fold", help="i/K: hold out fold i of K (1-based) of the stratified K-fold split")
    p.add_argument("--thresholds-from", nargs="+", metavar="MODEL",
                   help="refit on every row; thresholds tuned on these fold models' out-of-fold probabilities")
    opt("--threshold-metric", "metric the per-class thresholds maximise (the gate's)",
        choices=("f1_samples", "f1_micro", "f1_macro", "course_f_score"))
    opt("--device", "auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--run-id", help="resume this run from its last checkpoint in the store, or start it")
    p.add_argument("--share-cache", action="store_true",
                   help="pull the decoded-image cache from the store if another worker built it, else push it")
    p.add_argument("--expect-fingerprint", metavar="FP",
                   help="refuse to train (exit 2) unless the data has this fingerprint (e.g. the validated one)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="synchronise BatchNorm statistics over the ranks (SyncBatchNorm; CUDA, --nproc > 1)")
    opt("--min-batch-per-rank", "fewest images per process and forward pass without --sync-bn", type=int)
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

    p = add("cache", cmd_cache, "manage the decoded-image cache")
    cache = p.add_subparsers(dest="cache_cmd", required=True)
    cp = cache.add_parser("gc", help="remove cache entries unused for N days",
                          description="remove decoded-image cache entries unused for N days (local folder) and, "
                                      "with --store, shared entries created more than N days ago",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cache_arg(cp)
    cp.add_argument("--older-than-days", type=float, required=True, help="age in days")
    cp.add_argument("--store", help="also clean the shared caches under cache/ in this store")
    cp.add_argument("--dry-run", action="store_true", help="only list what would be removed")

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
                            help="remove incomplete versions and leftover probes only when older than this "
                                 "(a registration in progress is younger)")
            mp.add_argument("--uploads-older-than-hours", type=float, default=UPLOADS_MIN_AGE_S / 3600,
                            help="abort interrupted uploads (S3 multipart uploads, local temp files) anywhere in "
                                 "the store only when started longer ago than this: a long upload in progress "
                                 "(a decoded split pushed to the shared cache, large weights) is younger")
            mp.add_argument("--runs", action="store_true",
                            help="also delete runs/<id>/ checkpoints of runs whose version is registered, and of "
                                 "unfinished runs older than --run-age-days; never what a version's model.json "
                                 "names (its holdout probabilities)")
            mp.add_argument("--run-age-days", type=float, default=7.0,
                            help="an unregistered run untouched this long counts as abandoned")
            mp.add_argument("--run-min-age-hours", type=float, default=RUN_MIN_AGE_S / 3600,
                            help="never delete a run written to more recently than this, registered or not "
                                 "(a live retrain writes a checkpoint every epoch)")
            mp.add_argument("--keep-last", type=int, metavar="N",
                            help="list complete versions beyond the newest N (never the champion or any version in "
                                 "its promotion history) for deletion")
            mp.add_argument("--yes", action="store_true", help="with --keep-last: really delete those versions")

    p = add("datasets", cmd_datasets, "push datasets to the object store, list, collect and remove them")
    datasets = p.add_subparsers(dest="datasets_cmd", required=True)
    dp = datasets.add_parser("push", help="upload a dataset to datasets/<fingerprint>/ and print its URI",
                             description="upload a dataset (any accepted layout) to datasets/<fingerprint>/ in the "
                             "store, written once and complete or invisible; prints its s3:// (or folder) URI",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dp.add_argument("--data", required=True, help=DATA_HELP)
    store_arg(dp)
    cache_arg(dp)
    dp.add_argument("--channel", default=DEFAULT_CHANNEL, type=channel_name,
                    help="dataset channel to move to this dataset once it is complete (nightly retrains follow "
                         "channel:latest)")
    dp.add_argument("--wait-for-gc-minutes", type=float, default=15.0, metavar="M",
                    help="while a `datasets gc` holds datasets/gc.lock, wait up to M minutes for it to end, then "
                         "refuse (exit 9); the push writes datasets/pushes/<id>.json first, so gc never deletes "
                         "what it relies on")
    dp = datasets.add_parser("list", help="list the complete datasets in the store",
                             description="list the complete datasets in the store (newest first)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    store_arg(dp)
    dp.add_argument("--json", action="store_true", help="print a JSON array")
    dp.add_argument("--channel", type=channel_name, metavar="NAME",
                    help="list this channel's pushes instead, newest first (sequence, dataset, when, who, event id)")
    dp = datasets.add_parser("gc", help="delete content objects no dataset manifest names",
                             description="delete content objects (datasets/objects/) that no dataset manifest "
                             "names and that are older than the guard; every complete dataset is kept. It holds "
                             "datasets/gc.lock while it runs (a second gc is refused, exit 9; a lock older than 1 h "
                             "is abandoned and taken over), deletes nothing while a push is in progress (its "
                             "marker under datasets/pushes/ younger than 24 h; exit 9), and removes older, stale "
                             "markers left by pushes that died",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    store_arg(dp)
    dp.add_argument("--older-than-hours", type=float, default=24.0,
                    help="keep orphans younger than this: a push in flight uploads its objects before its manifest")
    dp.add_argument("--dry-run", action="store_true",
                    help="only count what would be deleted (takes no lock, writes nothing)")
    dp = datasets.add_parser("remove", help="remove a dataset nothing uses (its datasets/<fingerprint>/ manifest)",
                             description="remove datasets/<FINGERPRINT>/ (the manifest) unless a channel's head, "
                             "what runs resolving a channel get (its newest push validation has not refused), a "
                             "registered model version's data or a run resolution younger than 24 h names it "
                             "(exit 9, nothing removed); versions and resolutions are read from --store and every "
                             "--models-store; its content objects no other dataset names become orphans "
                             "that the next `datasets gc` deletes. Without --yes only says what would be removed. "
                             "Holds datasets/gc.lock like gc and removes nothing while a push is in progress (exit 9)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    store_arg(dp)
    dp.add_argument("fingerprint", metavar="FINGERPRINT", help="the dataset's fingerprint (16 hex digits, as in "
                    "datasets/<fingerprint>/)")
    dp.add_argument("--models-store", action="append", metavar="URI",
                    help="a store the runs training on --store's datasets write to (their flows' store when their "
                         "data names this store's channel, s3://data/datasets@latest with store=s3://models): its "
                         "model versions and run resolutions count as uses too; repeat for each. Required when "
                         "--store holds no model registry (registry/, models/; exit 2): name --store itself when "
                         "runs use it")
    dp.add_argument("--yes", action="store_true", help="really remove it (without: a dry run, nothing deleted)")
    return parser
