"""Training: loop functions that take their collaborators as arguments, and `fit`, which
wires them together with per-epoch checkpoints so a killed run resumes where it stopped."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from protein.config import TrainConfig, from_dict, to_dict
from protein.errors import DataError, ProteinError
from protein.evaluation.metrics import evaluate_predictions
from protein.evaluation.thresholds import cross_fit
from protein.labels import LABELS
from protein.modeling import distributed
from protein.modeling.batches import iterate_batches, prefetch
from protein.modeling.checkpoints import (
    CHECKPOINT_FORMAT,
    check_still_ours,
    checkpoint_key,
    metrics_key,
    read_checkpoint,
    save_checkpoint,
)
from protein.modeling.ema import ExponentialMovingAverage, make_ema
from protein.modeling.model import build_model
from protein.modeling.optimization import build_optimizer, make_loss
from protein.modeling.presets import EvalPreset, TrainPreset, dihedral_views
from protein.modeling.scaling import check_batch_split, ema_decay_per_step, scaled_lr, steps_per_epoch
from protein.storage import Store
from protein.storage.records import record_location

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


def select_device(name: str = "auto") -> torch.device:
    """The device to train on, with its index (`cuda:0`, not `cuda`): tensors report their device
    with the index, and comparisons against an unindexed one fail."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available")
    return distributed.resolved(device)


def autocast_context(device: torch.device) -> contextlib.AbstractContextManager:
    """The one precision path: bf16 autocast on CUDA, plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    preset: TrainPreset,
    device: torch.device,
    generator: torch.Generator | None = None,
    ema: ExponentialMovingAverage | None = None,
    accumulate: int = 1,
    device_generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One optimizer step on one batch (uint8 NHWC images, float targets; on the host or already
    on `device`); returns the batch's summed loss as a device tensor, never read here: nothing in
    the step waits for the GPU. With accumulate K the batch runs as K micro-batches whose
    gradients add up before the step (the mean over the batch, as one pass would give); under DDP
    only the last micro-batch all-reduces gradients. With `ema`, the average is updated after it."""
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    optimizer.zero_grad(set_to_none=True)
    micro = min(accumulate, len(images))
    chunks = list(zip(images.tensor_split(micro), targets.tensor_split(micro), strict=True))
    total = torch.zeros((), device=device)
    for i, (x_raw, y) in enumerate(chunks):
        x = preset(x_raw, generator, device_generator)
        sync = i == len(chunks) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync(), autocast_context(device):
            loss = loss_fn(model(x), y)
        # Weighted by the chunk's share, so the summed gradient is the batch mean.
        (loss * (len(x_raw) / len(images))).backward()
        total += loss.detach().float() * len(x_raw)
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema.update_parameters(unwrap(model))
    return total


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose weights count: inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "no_sync") else model


def train_one_epoch(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    loss_fn: nn.Module,
    preset: TrainPreset,
    device: torch.device,
    generator: torch.Generator | None = None,
    on_batch: Callable[[int], None] | None = None,
    ema: ExponentialMovingAverage | None = None,
    accumulate: int = 1,
    device_generator: torch.Generator | None = None,
) -> dict[str, float]:
    """One pass over `batches`, one `train_step` per batch."""
    model.train()
    # Summed on the device and read once per epoch: a per-step float() would make the CPU
    # wait for the GPU at every step.
    total_loss = torch.zeros((), device=device)
    seen = torch.zeros((), device=device, dtype=torch.float64)
    started = time.perf_counter()
    for images, targets in batches:
        total_loss += train_step(model, images, targets, optimizer, scheduler, loss_fn, preset, device, generator,
                                 ema, accumulate, device_generator)
        seen += len(images)
        if on_batch:
            on_batch(len(images))
    seconds = time.perf_counter() - started
    # One read per epoch: the loss over every rank's images.
    summed = distributed.all_reduce_sum(torch.stack([total_loss.double(), seen]), device)
    loss_sum, n = summed.tolist()
    return {"train_loss": loss_sum / max(n, 1), "train_images": int(n), "train_seconds": seconds,
            "train_images_per_s": n / seconds if seconds > 0 else 0.0}


def prediction_batches(images: np.ndarray, indices: np.ndarray, batch_size: int,
                       device: torch.device) -> Generator[torch.Tensor, None, None]:
    """images[indices] in batches of batch_size, in order. On CUDA, page-locked and read ahead by a
    thread, copied while the GPU works on the last one: close them when the caller stops early."""
    batches = (torch.from_numpy(np.ascontiguousarray(images[indices[start : start + batch_size]]))
               for start in range(0, len(indices), batch_size))
    if device.type == "cuda":
        return prefetch(batch.pin_memory() for batch in batches)
    return batches


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    images: np.ndarray,
    preset: EvalPreset,
    device: torch.device,
    batch_size: int = 64,
    indices: np.ndarray | None = None,
    tta: bool = False,
) -> np.ndarray:
    """Sigmoid probabilities (N, C) for images[indices] (all images when indices is None); with
    tta, the mean of the probabilities of the 8 dihedral views of each image."""
    model.eval()
    if indices is None:
        indices = np.arange(len(images))
    batches = prediction_batches(images, indices, batch_size, device)
    outputs: list[torch.Tensor] = []
    # Closed here, not when collected: a raised error's traceback keeps this frame, and with it the
    # prefetch thread and its pinned batches, alive as long as the error is kept (Prefect keeps it).
    with contextlib.closing(batches):
        for batch in batches:
            x = preset(batch.to(device, non_blocking=True))
            views = dihedral_views(x) if tta else [x]
            probs = torch.zeros((), device=device)
            for view in views:
                with autocast_context(device):
                    logits = model(view)
                probs = probs + torch.sigmoid(logits.float())
            # Kept on the device until the end: a .cpu() per batch would wait for the GPU each time.
            outputs.append(probs / len(views))
    if not outputs:
        return np.zeros((0, len(LABELS)), dtype=np.float32)
    return torch.cat(outputs).cpu().numpy().astype(np.float32)


def evaluate_shards(
    model: nn.Module,
    images: np.ndarray,
    preset: EvalPreset,
    device: torch.device,
    batch_size: int,
    indices: np.ndarray,
    rank: distributed.Rank,
    tta: bool = False,
) -> np.ndarray:
    """predict_probs over `indices`, each rank scoring only its shard; every rank gets all rows
    back in order, so metrics and thresholds are those of the whole holdout."""
    local = predict_probs(model, images, preset, device, batch_size, distributed.shard(indices, rank), tta=tta)
    return distributed.gather_rows(local, len(indices), device)


def bce(probs: np.ndarray, targets: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)).mean())


@dataclass
class FitResult:
    model: nn.Module
    config: TrainConfig
    history: list[dict[str, Any]]
    holdout_probs: np.ndarray
    thresholds: np.ndarray
    metrics: dict[str, Any]
    resumed_from_epoch: int = 0
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Training:
    """Everything a training step needs, built once per run by `build_training` (fit and
    bench/gpu.py both start here, so the bench times what users run)."""

    model: nn.Module  # the plain module: checkpointed, and what rank 0 broadcasts
    step_model: nn.Module  # what the step calls: the model, or its DDP / compiled wrapper
    ema: ExponentialMovingAverage | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss_fn: nn.Module
    train_preset: TrainPreset
    eval_preset: EvalPreset
    layout: dict[str, Any]  # how the batch, learning rate and average scale: recorded in model.json

    def train_epoch(self, config: TrainConfig, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device, generators: tuple[torch.Generator, torch.Generator],
                    on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
        return train_one_epoch(self.step_model, batches, self.optimizer, self.scheduler, self.loss_fn,
                               self.train_preset, device, generators[0], on_batch, self.ema, config.accumulate,
                               generators[1])


def build_training(config: TrainConfig, device: torch.device, n_train: int,
                   rank: distributed.Rank = distributed.Rank()) -> Training:
    """Model, average, optimizer, schedule and presets for `config` on `device`: every tensor on
    the device (what crosses ranks must live where NCCL communicates)."""
    micro_batch = check_batch_split(config, rank.world_size)
    if config.sync_bn and rank.distributed and device.type != "cuda":
        raise ValueError("--sync-bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); drop it on CPU")
    if device.type == "cuda":
        # Training shapes are fixed (the ragged last batch is dropped): autotuning pays off.
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(config.seed)
    model = build_model(config.arch, len(LABELS), config.weights, config.image_size)
    if config.sync_bn and rank.distributed:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    channels_last = config.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps = steps_per_epoch(n_train, config.batch_size)
    decay = ema_decay_per_step(config.ema_half_life_epochs, steps)
    ema = make_ema(model, decay) if decay > 0 else None
    optimizer, scheduler = build_optimizer(model, config, steps)
    step_model: nn.Module = model
    if rank.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # Every rank holds the same checkpoint (or the same seeded init); DDP also broadcasts
        # rank 0's weights once, then averages gradients at every step.
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)
    layout = {"world_size": rank.world_size, "global_batch": config.batch_size, "accumulate": config.accumulate,
              "micro_batch_per_rank": micro_batch, "steps_per_epoch": steps,
              "backend": ("nccl" if device.type == "cuda" else "gloo") if rank.distributed else None,
              "peak_lr": scaled_lr(config.lr, config.batch_size, config.lr_reference_batch, config.lr_scaling),
              "lr_rule": {"lr": config.lr, "reference_batch": config.lr_reference_batch, "scaling": config.lr_scaling},
              "ema": {"half_life_epochs": config.ema_half_life_epochs, "decay_per_step": decay,
                      "warmup": "min(decay, (1 + k) / (10 + k)) at update k"} if ema is not None else None,
              "sync_bn": bool(config.sync_bn and rank.distributed), "min_batch_per_rank": config.min_batch_per_rank,
              "channels_last": channels_last, "cudnn_benchmark": device.type == "cuda",
              "precision": "bf16 autocast" if device.type == "cuda" else "fp32"}
    return Training(model, step_model, ema, optimizer, scheduler, make_loss(config),
                    TrainPreset(channels_last=channels_last, jitter=config.jitter),
                    EvalPreset(channels_last=channels_last), layout)


def epoch_batches(config: TrainConfig, images: np.ndarray, targets: np.ndarray, train_idx: np.ndarray,
                  epoch: int, device: torch.device, rank: distributed.Rank = distributed.Rank()
                  ) -> tuple[Generator[tuple[torch.Tensor, torch.Tensor], None, None],
                             tuple[torch.Generator, torch.Generator]]:
    """One epoch's batches and its (host, device) augmentation generators. Everything random in
    an epoch derives from (seed, epoch), so a resumed run needs no RNG state: the batch order is
    the same on every rank; augmentation draws differ per rank. On CUDA the batches are read ahead
    by a thread: close them when the epoch stops early."""
    torch.manual_seed(config.seed * 1_000_003 + epoch + 7_919 * rank.rank)
    order = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    augment_seed = config.seed * 1_000_003 + epoch + 7_919 * (rank.rank + 1)
    generators = (torch.Generator().manual_seed(augment_seed),
                  torch.Generator(device=device).manual_seed(augment_seed + 1))
    batches = iterate_batches(images, targets, train_idx, config.batch_size, order,
                              pin_memory=device.type == "cuda", drop_last=True, rank=rank)
    if device.type == "cuda":
        batches = prefetch(batches)
    return batches, generators


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is a finite number: one reduction per parameter, one device sync."""
    checks = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(checks).all().item()) if checks else True


def fit(
    config: TrainConfig,
    images: np.ndarray,
    targets: np.ndarray,
    train_idx: np.ndarray,
    holdout_idx: np.ndarray,
    store: Store,
    run_id: str,
    on_epoch: EpochCallback | None = None,
    on_batch: Callable[[int], None] | None = None,
    data_fingerprint: str | None = None,
    split_digest: str | None = None,
    unrecorded_split_may_differ: bool = False,
) -> FitResult:
    """Train for config.epochs, checkpointing every epoch under runs/<run_id>/ in the store.

    If that run already has a checkpoint it resumes from the epoch after it, only on the data it
    was started on (``data_fingerprint``) and split (``split_digest``), both recorded in the
    checkpoint; a checkpoint without a split digest (written before it was recorded) resumes only
    when not ``unrecorded_split_may_differ``. Batch order,
    augmentation and dropout are seeded per epoch, so on CPU a resumed run reproduces an
    uninterrupted one. With config.ema_half_life_epochs the moving average of the weights is
    what is evaluated and returned. An empty holdout (a refit on every row) skips evaluation:
    the caller supplies thresholds and metrics.
    """
    rank = distributed.current()
    device = distributed.rank_device(select_device(config.device), rank)
    log.info("training %s at %d px on %s (%d train / %d holdout images; rank %d of %d)",
             config.arch, config.image_size, device, len(train_idx), len(holdout_idx), rank.rank, rank.world_size)
    run = build_training(config, device, len(train_idx), rank)
    model, ema, optimizer, scheduler = run.model, run.ema, run.optimizer, run.scheduler
    history: list[dict[str, Any]] = []
    start_epoch = 0

    # The etag the next checkpoint is written against: another attempt of this run that writes in
    # between (a host given up on but alive) makes this one stop (protein/modeling/checkpoints.py).
    state, checkpoint_etag = read_checkpoint(store, run_id)
    if state is not None:
        saved = from_dict(TrainConfig, state["config"])
        if saved != config:
            raise ProteinError(
                f"run {run_id} was started with a different config; use a new --run-id "
                f"(saved: {to_dict(saved)}, now: {to_dict(config)})"
            )
        # Other data under the same run id (a push between two attempts of a standalone train, a
        # rerun with --run-id): the weights would go on from rows the new split may hold out, and
        # the scheduler's steps were counted for the old row count.
        started_on = state.get("data_fingerprint")
        if data_fingerprint is not None and started_on is not None and started_on != data_fingerprint:
            raise DataError(f"run {run_id} was started on data {str(started_on)[:16]}, not this data "
                            f"({data_fingerprint[:16]}): its weights trained on that data's rows; use a new --run-id")
        # The same data split otherwise (byte-identical copies are kept on one side since the
        # split digest was recorded): the weights would go on from rows now held out, and be scored on them.
        split_of_run = state.get("split_digest")
        if split_digest is not None and split_of_run is not None and split_of_run != split_digest:
            raise DataError(f"run {run_id} was trained on split {str(split_of_run)[:16]}, not this run's split "
                            f"({split_digest[:16]}): its weights trained on rows this split holds out; "
                            "use a new --run-id")
        if split_digest is not None and split_of_run is None and unrecorded_split_may_differ:
            raise DataError(f"run {run_id}'s checkpoint does not record its split, and on this data (byte-identical "
                            "images under two ids) the split has changed since it was written: its weights may "
                            "have trained on rows now held out; start a new run with a new --run-id")
        start_epoch = int(state["epoch"])
        if start_epoch < config.epochs:  # the last epoch's checkpoint has none: nothing trains after it
            if not {"optimizer", "scheduler"} <= state.keys():
                raise ProteinError(f"{record_location(store, checkpoint_key(run_id))}: the checkpoint of epoch "
                                 f"{start_epoch} of {config.epochs} holds no optimizer state to continue from; "
                                 "use a new --run-id")
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        history = [json.loads(h) for h in state["history"]]
        log.info("resuming run %s after epoch %d", run_id, start_epoch)

    # The weights that are evaluated and shipped: the average when there is one. Never the
    # compiled module: eval mode and the ragged last eval batch would recompile it.
    eval_model = ema.module if ema is not None else model
    eval_preset = run.eval_preset
    holdout_targets = targets[holdout_idx]
    holdout_probs = np.zeros((len(holdout_idx), len(LABELS)), dtype=np.float32)
    eval_batch = max(2 * config.batch_size // rank.world_size, 1)
    for epoch in range(start_epoch, config.epochs):
        batches, generators = epoch_batches(config, images, targets, train_idx, epoch, device, rank)
        # Closed here, not when collected: a failed step's (CUDA OOM, NCCL error) traceback keeps
        # this frame alive while the error is kept, and Prefect retries in this process.
        with contextlib.closing(batches):
            stats = run.train_epoch(config, batches, device, generators, on_batch)
        # The epoch's loss is each step's before its update: the weights the last step left are
        # checked too (one device sync an epoch).
        if not math.isfinite(stats["train_loss"]) or not weights_finite(model):
            # Before its checkpoint: NaN weights written there would be resumed, and registered by a
            # refit (no holdout to catch them), with metrics that are not this model's.
            from protein.errors import TrainingDiverged

            what = (f"the training loss is {stats['train_loss']}" if not math.isfinite(stats["train_loss"])
                    else "its weights after the epoch's last step are not finite numbers")
            raise TrainingDiverged(f"training run {run_id} diverged at epoch {epoch + 1}: {what}; "
                                   "nothing of this epoch was kept and nothing is registered. "
                                   f"Lower the learning rate (lr {config.lr:g}, lr_scaling {config.lr_scaling}) "
                                   f"or the weight decay ({config.weight_decay:g}), in a new run")
        distributed.sync_from_main(model, device)
        if ema is not None:
            distributed.sync_from_main(ema, device)
        record: dict[str, Any] = {"epoch": epoch + 1, "epochs": config.epochs, **stats}
        if len(holdout_idx):
            # TTA multiplies evaluation by 8: per epoch only the plain view, TTA once at the end.
            holdout_probs = evaluate_shards(eval_model, images, eval_preset, device, eval_batch, holdout_idx, rank)
            scores = evaluate_predictions(holdout_probs, holdout_targets, 0.5)
            record.update({"holdout_loss": bce(holdout_probs, holdout_targets),
                           "holdout_f1_samples": scores["f1_samples"], "holdout_f1_macro": scores["f1_macro"],
                           "holdout_course_f_score": scores["course_f_score"]})
        record["lr"] = scheduler.get_last_lr()[0]
        history.append(record)
        if not rank.is_main:  # one writer: rank 0 holds the same weights as every other rank
            if on_epoch:
                on_epoch(record)
            continue
        # The last epoch's checkpoint only lets a run that dies before it registers skip training on
        # its retry (the config, epochs included, must match to resume): nothing trains after it, so
        # the optimizer's state stays out. Under AdamW that is two copies of the weights: the
        # checkpoint a one-epoch resnet18 run uploads drops from 128 MiB to 43 MiB.
        resumable = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()} \
            if epoch + 1 < config.epochs else {}
        checkpoint_etag = save_checkpoint(store, run_id, {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch + 1,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else {},
            **resumable,
            "config": to_dict(config),
            "data_fingerprint": data_fingerprint,
            "split_digest": split_digest,
            "class_names": list(LABELS),
            "history": [json.dumps(h) for h in history],
        }, expected_etag=checkpoint_etag)
        check_still_ours(store, run_id, checkpoint_etag)
        store.put_bytes(metrics_key(run_id), "".join(json.dumps(h) + "\n" for h in history).encode())
        log.info("epoch %d/%d %s", epoch + 1, config.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float)))
        if on_epoch:
            on_epoch(record)

    shipped = ema.module if ema is not None else model
    if not len(holdout_idx):
        return FitResult(model=shipped, config=config, history=history, holdout_probs=holdout_probs,
                         thresholds=np.full(len(LABELS), 0.5, dtype=np.float32), metrics={},
                         resumed_from_epoch=start_epoch, device=str(device), extra={"layout": run.layout})
    if config.tta or start_epoch >= config.epochs:  # TTA, or a resumed finished run (no probs in the checkpoint)
        holdout_probs = evaluate_shards(shipped, images, eval_preset, device, eval_batch, holdout_idx, rank,
                                        tta=config.tta)
    tuned = cross_fit(holdout_probs, holdout_targets, config.threshold_metric, seed=config.seed)
    # Tuned thresholds flatter the rows they were tuned on: the reported scores are cross-fitted.
    metrics = tuned.metrics()
    return FitResult(model=shipped, config=config, history=history, holdout_probs=holdout_probs,
                     thresholds=tuned.thresholds, metrics=metrics, resumed_from_epoch=start_epoch, device=str(device),
                     extra={"layout": run.layout})
