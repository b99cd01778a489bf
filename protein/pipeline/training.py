"""Train and register a challenger, in this process or on several ranks under torchrun."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protein.config import TrainConfig, to_dict
from protein.data import CompetitionData, fingerprint, load_competition
from protein.errors import DataError, OutOfMemory, ProteinError, RankZeroError, TrainingFailed, is_out_of_memory
from protein.evaluation.gate import ids_digest
from protein.evaluation.thresholds import CrossFit
from protein.labels import LABELS
from protein.modeling import distributed
from protein.modeling.ensemble import check_refit_matches_folds, out_of_fold_thresholds, save_holdout_probs
from protein.modeling.model import IMAGENET, check_input_size, imagenet_weights
from protein.modeling.presets import IMAGE_MEAN, IMAGE_STD
from protein.modeling.scaling import check_batch_split
from protein.modeling.train import EpochCallback, fit, select_device
from protein.pipeline.inputs import (
    check_fingerprint,
    has_byte_identical_copies,
    load_split_images,
    new_run_id,
    split_digest,
    summarize,
    training_split,
)
from protein.registry import Registry, check_version_id
from protein.storage import Store, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingInputs:
    """What every training entry point starts from: a checked store, the data, its fingerprint and the run id."""

    store: Store
    data: CompetitionData
    data_fingerprint: str
    run_id: str


def open_training_inputs(
    data_path: str | os.PathLike[str],
    store_uri: str,
    run_id: str | None,
    cache_dir: Path | None,
    expected_fingerprint: str | None,
) -> TrainingInputs:
    """Open and check the store, load the data and refuse it if it changed since validation
    (`FingerprintMismatch`); a run id not given is derived from the data's fingerprint."""
    store = open_store(store_uri)
    store.check()
    data = load_competition(data_path, require_test=False, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    check_fingerprint(data.source.description, data_fingerprint, expected_fingerprint)
    run_id = run_id or new_run_id(data_fingerprint)
    check_version_id(run_id)
    return TrainingInputs(store, data, data_fingerprint, run_id)


def train_and_register(
    data_path: str | os.PathLike[str],
    store_uri: str,
    config: TrainConfig,
    run_id: str | None = None,
    cache_dir: Path | None = None,
    on_epoch: EpochCallback | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_decode: Callable[[int], None] | None = None,
    share_cache: bool = False,
    expected_fingerprint: str | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """Train on a dataset and register the result as a new (not yet promoted) model version.

    actor is recorded in the registration event (default user@host; a Prefect task passes its flow run).

    share_cache pulls the decoded-image cache from the store when another worker built it, and
    pushes it there otherwise. Under torchrun each rank calls this: they train together (DDP)
    and rank 0 alone registers; the other ranks return {"model_id": None, "rank": r}.
    expected_fingerprint (the one validation saw) makes training refuse data that changed since:
    `FingerprintMismatch`, before anything is trained or registered."""
    with distributed.process_group(select_device(config.device)):
        return _train_and_register(data_path, store_uri, config, run_id, cache_dir, on_epoch, on_batch, on_decode,
                                   share_cache, expected_fingerprint, actor)


def _train_and_register(
    data_path: str | os.PathLike[str],
    store_uri: str,
    config: TrainConfig,
    run_id: str | None,
    cache_dir: Path | None,
    on_epoch: EpochCallback | None,
    on_batch: Callable[[int], None] | None,
    on_decode: Callable[[int], None] | None,
    share_cache: bool,
    expected_fingerprint: str | None,
    actor: str | None,
) -> dict[str, Any]:
    rank = distributed.current()
    if rank.distributed and run_id is None:
        # A derived id carries the time: ranks would disagree on it, and on the checkpoint to resume.
        raise ValueError("a run on several ranks needs --run-id (the launcher of `protein train --nproc` sets it)")
    check_input_size(config.arch, config.image_size)  # before the data is opened or decoded
    inputs = open_training_inputs(data_path, store_uri, run_id, cache_dir, expected_fingerprint)
    store, data, data_fingerprint, run_id = inputs.store, inputs.data, inputs.data_fingerprint, inputs.run_id
    registry = Registry(store, actor=actor)
    finished = registry.find_by_run(run_id)
    if finished is not None:
        # A retry after the version was registered (e.g. the task died while reporting):
        # the run is done, registering it twice would only duplicate the version.
        spec = registry.spec(finished)
        if spec.get("data_fingerprint") != data_fingerprint:  # not this data's model, whatever the run id says
            raise DataError(f"run {run_id} already registered {finished}, trained on data "
                            f"{str(spec.get('data_fingerprint'))[:16]}, not this data ({data_fingerprint[:16]}); "
                            "use a new --run-id")
        log.info("run %s already registered %s; not training again", run_id, finished)
        return {"model_id": finished, "path": f"{store.uri.rstrip('/')}/models/{finished}", "run_id": run_id,
                "data_fingerprint": data_fingerprint, "metrics": summarize(spec.get("metrics", {})),
                "resumed_from_epoch": spec["train_config"]["epochs"], "device": spec.get("device")}
    oof: tuple[CrossFit, dict[str, Any]] | None = None
    if config.refit:  # fail before training if the fold models cannot supply thresholds
        oof = out_of_fold_thresholds(registry, config.thresholds_from, data, config.threshold_metric, config.seed,
                                     data_fingerprint)
        check_refit_matches_folds(registry, config)
    # One decoder per host: its first rank decodes (or finds the cache `--nproc` built before
    # launching); the others wait and memory-map the finished file.
    if rank.local_rank == 0:
        images = load_split_images(data, "train", config.image_size, data_fingerprint, cache_dir, on_decode,
                                   shared=store if share_cache else None)
    distributed.barrier()
    if rank.local_rank != 0:
        images = load_split_images(data, "train", config.image_size, data_fingerprint, cache_dir)
    train_idx, holdout_idx = training_split(data, config)
    try:
        # A checkpoint written before it recorded its split resumes only where the split is provably
        # the one it trained on: a refit's (every row), or data without byte-identical copies.
        result = fit(config, images, data.targets, train_idx, holdout_idx, store, run_id, on_epoch, on_batch,
                     data_fingerprint=data_fingerprint,
                     split_digest=split_digest(data, train_idx, holdout_idx),
                     unrecorded_split_may_differ=not config.refit and has_byte_identical_copies(data))
    except Exception as exc:
        if is_out_of_memory(exc):
            raise OutOfMemory(out_of_memory_message(exc, config, run_id, rank.world_size)) from exc
        raise
    if not rank.is_main:
        return {"model_id": None, "rank": rank.rank, "run_id": run_id}

    thresholds, metrics = result.thresholds, result.metrics
    holdout: dict[str, Any] = {"fraction": config.holdout_fraction, "seed": config.seed, "fold": config.fold,
                               "folds": config.folds, "n_train": int(len(train_idx)),
                               "n_holdout": int(len(holdout_idx))}
    if len(holdout_idx):
        holdout["probs_key"] = save_holdout_probs(store, run_id, data, holdout_idx, result.holdout_probs)
    refit: dict[str, Any] | None = None
    if oof is not None:
        # Trained on every row: no holdout of its own. Its thresholds and its reported scores are
        # the fold models' out-of-fold ones (cross-fitted), recorded as such.
        tuned, info = oof
        thresholds, metrics = tuned.thresholds, tuned.metrics()
        refit = {"trained_on": "all rows", **info}
        holdout = {"fraction": None, "seed": config.seed, "fold": None, "folds": None,
                   "n_train": int(len(train_idx)), "n_holdout": 0}
    spec = {
        "arch": config.arch,
        "image_size": config.image_size,
        "normalization": {"mean": list(IMAGE_MEAN), "std": list(IMAGE_STD)},
        "class_names": list(LABELS),
        "thresholds": [float(t) for t in thresholds],
        "tta": config.tta,
        "recipe": config.recipe,
        "weights_init": describe_weights(config),
        "ema": (result.extra.get("layout") or {}).get("ema"),
        "refit": refit,
        "metrics": metrics,
        "history": result.history,
        "data_fingerprint": data_fingerprint,
        # The dataset as the run resolved it (a channel resolves to an immutable datasets/<fp>/ URI).
        "data_uri": data.source.description,
        # Lineage: the label profile of the data it was trained on. Promotion makes it the drift
        # reference (protein.validation.write_reference_profile), so the hash here is the one the
        # next validation runs are keyed by.
        "label_profile": training_label_profile(data.train_label_sets),
        # The exact rows, so a later gate scores this model only on rows it never trained on,
        # whatever happens to the data (see docs/gate.md).
        "holdout": {**holdout, "ids": [data.train_ids[i] for i in holdout_idx],
                    "ids_sha256": ids_digest(data.train_ids[i] for i in holdout_idx)},
        "training_rows": {"ids": [data.train_ids[i] for i in train_idx],
                          "sha256": ids_digest(data.train_ids[i] for i in train_idx)},
        "train_config": to_dict(config),
        "parent_champion": registry.champion().champion,
        "run_id": run_id,
        "device": result.device,
        # How the global batch was split (ranks, accumulation) and what scaled with it: the peak
        # learning rate, the EMA's per-step decay, SyncBatchNorm, the per-rank floor.
        "training": result.extra.get("layout"),
    }
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="protein-weights-") as tmp:
        weights = Path(tmp) / "model.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        save_file(state, str(weights), metadata={"arch": config.arch, "format": "protein-model/1"})
        model_id = registry.register(weights, spec)
    return {
        "model_id": model_id,
        "path": f"{store.uri.rstrip('/')}/models/{model_id}",
        "run_id": run_id,
        "data_fingerprint": data_fingerprint,
        "metrics": summarize(metrics),
        "resumed_from_epoch": result.resumed_from_epoch,
        "device": result.device,
    }


def train_on_ranks(
    nproc: int,
    data_path: str | os.PathLike[str],
    store_uri: str,
    config: TrainConfig,
    run_id: str | None = None,
    cache_dir: Path | None = None,
    on_decode: Callable[[int], None] | None = None,
    share_cache: bool = False,
    expected_fingerprint: str | None = None,
    actor: str | None = None,
) -> dict[str, Any]:
    """train_and_register on nproc ranks of this host under torchrun (one per GPU; gloo on CPU).

    The decoded-image cache is built here, once, before any rank starts; the run id is fixed
    here so every rank (and a rerun after a failure) uses the same checkpoint."""
    # Usage errors (ProteinError, exit 2), not ValueErrors, which the train task retries as transient:
    # twice more on the same settings, then a traceback.
    if nproc < 1:
        raise ProteinError(f"nproc must be >= 1, got {nproc}")
    try:
        check_batch_split(config, nproc)  # before anything starts: one clear line, not N tracebacks
    except ValueError as exc:
        raise ProteinError(str(exc)) from None
    check_input_size(config.arch, config.image_size)
    device = select_device(config.device)
    if device.type == "cuda" and nproc > torch_cuda_devices():
        raise ProteinError(f"--nproc {nproc}: one process per GPU, but this machine has {torch_cuda_devices()} "
                           "(CUDA_VISIBLE_DEVICES)")
    inputs = open_training_inputs(data_path, store_uri, run_id, cache_dir, expected_fingerprint)
    run_id = inputs.run_id
    load_split_images(inputs.data, "train", config.image_size, inputs.data_fingerprint, cache_dir, on_decode,
                      shared=inputs.store if share_cache else None)
    with tempfile.TemporaryDirectory(prefix="protein-job-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"data": str(data_path), "store": store_uri, "config": to_dict(config),
                                   "run_id": run_id, "cache_dir": str(cache_dir) if cache_dir else None,
                                   "expected_fingerprint": inputs.data_fingerprint, "actor": actor}))
        code, result = distributed.launch(nproc, ["train-job", str(job)])
    if result is not None and "error" in result:
        raise error_of_rank(result)
    if result is None:
        raise TrainingFailed(f"training run {run_id} on {nproc} ranks failed (torchrun exit {code}; the failing "
                             f"rank's error is above); rerun with run id {run_id} to resume from its last checkpoint")
    return result


def error_of_rank(result: dict[str, Any]) -> ProteinError:
    """A rank's own error (distributed.write_error) as the class it was raised as, so the train
    task decides on it as on a one-rank run's: a store outage retried, an out-of-memory caught as
    OutOfMemory. A class this module does not know (or one that names another exit code) comes back
    as RankZeroError with the rank's message and exit code."""
    from protein import errors

    message, code = str(result["error"]), int(result.get("exit_code", TrainingFailed.exit_code))
    known = getattr(errors, str(result.get("type")), None)
    if isinstance(known, type) and issubclass(known, ProteinError) and known is not RankZeroError:
        try:
            error = known(message)
        except TypeError:  # a class with other arguments
            error = None
        if error is not None and error.exit_code == code:
            return error
    return RankZeroError(message, code)


def out_of_memory_message(error: BaseException, config: TrainConfig, run_id: str, ranks: int) -> str:
    """One line: what ran out, at which split of the batch, and what to change. A retry cannot
    change the config (a resume refuses another one), so the run is not retried."""
    lines = str(error).strip().splitlines()
    what = lines[0] if lines else type(error).__name__
    per_pass = check_batch_split(config, ranks)  # the split training ran with (checked before it started)
    return (f"training run {run_id} ran out of memory at batch size {config.batch_size} "
            f"(--accumulate {config.accumulate}, {ranks} rank(s): {per_pass} images a forward pass): {what}. "
            "Not retried: the same config runs out of memory again. Start a new run with a smaller "
            "--batch-size (the flow's train.batch_size), or keep the batch and split it with --accumulate K "
            "(train.accumulate): each forward pass then holds batch/K images (docs/distributed.md)")


def torch_cuda_devices() -> int:
    import torch

    return torch.cuda.device_count()


def describe_weights(config: TrainConfig) -> dict[str, Any] | None:
    """Where the initial weights came from, for model.json."""
    if not config.weights:
        return None
    if config.weights == IMAGENET:
        weights = imagenet_weights(config.arch)
        return {"source": IMAGENET, "enum": weights.enum_name, "file": weights.path.name, "url": weights.url}
    return {"source": "file", "file": Path(config.weights).name}


def training_label_profile(label_sets: list[frozenset[int]]) -> dict[str, Any]:
    from protein.validation.drift import profile_hash, profile_labels

    profile = profile_labels(label_sets)
    return {**profile, "hash": profile_hash(profile)}
