"""Verbs that train: train (on one process or --nproc ranks), train-job (one rank), archs."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any

from protein.cli.output import emit, progress_bar
from protein.config import DEVICE_NAME, TrainConfig, recipe_config

log = logging.getLogger("protein")


def parse_fold(text: str | None) -> tuple[int | None, int | None]:
    """'i/K' -> (i, K), 1 <= i <= K."""
    if text is None:
        return None, None
    try:
        fold, folds = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--fold expects i/K (e.g. 1/5 for the first of 5 folds), got {text!r}") from None
    return fold, folds


# What --device may name: torch accepts more (xpu, meta, ...), but training here only knows these.


def check_device(text: str | None) -> str | None:
    """``--device`` checked before any work: torch would refuse a bad name only when training starts."""
    if text is not None and not DEVICE_NAME.fullmatch(text):
        raise ValueError(f"--device expects auto, cpu, mps, cuda or cuda:N (N a GPU index), got {text!r}")
    return text


def check_run_id_option(run_id: str | None) -> None:
    """``--run-id`` checked as the usage error it is (exit 2), not as a registry error (exit 4) met later."""
    from protein.errors import RegistryError
    from protein.registry.records import check_run_id

    if run_id is not None:
        try:
            check_run_id(run_id)
        except RegistryError:
            raise ValueError(f"--run-id {run_id!r}: expected 1-128 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit, without '..'") from None


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The recipe's config with every option given on the command line on top."""
    fold, folds = parse_fold(args.fold)
    check_device(args.device)
    return recipe_config(args.recipe, arch=args.arch, epochs=args.epochs, image_size=args.image_size,
                         batch_size=args.batch_size, accumulate=args.accumulate, seed=args.seed, lr=args.lr,
                         lr_scaling=args.lr_scaling, lr_reference_batch=args.lr_reference_batch,
                         sync_bn=args.sync_bn, min_batch_per_rank=args.min_batch_per_rank,
                         weight_decay=args.weight_decay,
                         loss=args.loss, holdout_fraction=args.holdout, weights=args.weights, device=args.device,
                         compile=args.compile or None, jitter=args.jitter,
                         ema_half_life_epochs=args.ema_half_life_epochs, tta=args.tta,
                         fold=fold, folds=folds, refit=bool(args.thresholds_from) or None,
                         thresholds_from=tuple(args.thresholds_from) if args.thresholds_from else None,
                         threshold_metric=args.threshold_metric)


def cmd_archs(args: argparse.Namespace) -> int:
    from protein.modeling.arch_names import architectures

    emit(list(architectures()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from protein.modeling import distributed
    from protein.pipeline import train_and_register, train_on_ranks

    config = train_config_from_args(args)
    check_run_id_option(args.run_id)
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
    from protein.config import from_dict
    from protein.errors import ProteinError
    from protein.modeling import distributed
    from protein.pipeline import train_and_register

    if "LOCAL_RANK" in os.environ:  # started by torchrun (not a test calling this in process)
        distributed.exit_with_launcher()
    job = json.loads(Path(args.job).read_text())
    config = from_dict(TrainConfig, job["config"])
    try:
        result = train_and_register(job["data"], job["store"], config, run_id=job["run_id"],
                                    cache_dir=Path(job["cache_dir"]) if job["cache_dir"] else None,
                                    expected_fingerprint=job.get("expected_fingerprint"), actor=job.get("actor"))
    except ProteinError as exc:
        # The rank's own error, for the launcher to raise with its exit code (a superseded checkpoint
        # is 10, an out-of-memory 11, not 7's "a rank died, rerun": a rerun would repeat them). Any
        # rank's: one that stops first takes the others down with it.
        distributed.write_error(str(exc), exc.exit_code, type(exc).__name__)
        raise
    distributed.write_result(result)
    return 0
