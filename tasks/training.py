"""The training task, and the device check every task that runs a model makes first.

The library calls that load torch are imported in the task bodies: every retrain run imports
this module, and a run that trains nothing (a nightly on unchanged data, a superseded push, data
that fails validation) would otherwise spend 1.5-2.5 s of its start loading torch and torchvision.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from protein.config import TrainConfig
from protein.modeling.devices import DevicePolicy, choose_device
from protein.process_gc import import_frozen
from tasks import events
from tasks.registry import prefect_actor
from tasks.retry import retry_transient


def device_for(requested: str, policy: DevicePolicy) -> str:
    """Checked before any data is read: a gpu-pool run on a host without CUDA fails in seconds."""
    import torch

    return choose_device(requested, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"), policy)


# The timeout bounds training alone: GPU slots are queued on the server (the gpu work pool's
# concurrency limit, one slot per card), so a run only starts when a card is free and never
# spends its timeout waiting for one.
@task(name="train-model", retries=2, retry_delay_seconds=[10, 60], timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE, retry_condition_fn=retry_transient)
def train_model(data: str, store: str, config: TrainConfig, run_id: str, share_cache: bool = False,
                policy: DevicePolicy = DevicePolicy(), expected_fingerprint: str | None = None,
                nproc: int = 1) -> dict[str, Any]:
    """Train and register a challenger. A retry reuses run_id, so it resumes from the last
    epoch checkpoint in the store instead of starting over. nproc > 1 trains on that many
    processes under torchrun (the ranks log to this worker's stderr, not to Prefect)."""
    import_frozen(["protein.pipeline"])  # torch and torchvision: their objects out of the collector's way
    from protein.modeling.train import select_device
    from protein.pipeline import train_and_register, train_on_ranks

    logger = get_run_logger()
    # A check only: for 'auto' the answer is what training picks anyway, so the config (saved in
    # the checkpoint and compared on resume) stays as the caller built it.
    device = str(select_device(device_for(config.device, policy)))  # 'auto' shown as what it resolves to
    logger.info("training %s at %d px on device %s (run %s)", config.arch, config.image_size, device, run_id)
    if device.startswith("cuda"):
        import torch

        logger.info("GPU: %s; bf16 autocast and channels_last enabled", torch.cuda.get_device_name(device))
    progress_id = create_progress_artifact(0.0, key="training-progress", description=f"run {run_id}")
    history: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        history.append(history_row(record))
        update_progress_artifact(progress_id, 100.0 * record["epoch"] / record["epochs"],
                                 description=f"epoch {record['epoch']}/{record['epochs']}: "
                                 f"holdout F1 {record['holdout_f1_samples']:.3f}")
        logger.info("epoch %d/%d train_loss %.4f holdout_f1_samples %.4f (%.1f img/s)", record["epoch"],
                    record["epochs"], record["train_loss"], record["holdout_f1_samples"],
                    record["train_images_per_s"])

    actor = prefect_actor()  # the registration's event names this flow run, as a promotion's does
    if nproc > 1:
        result = train_on_ranks(nproc, data, store, config, run_id=run_id, share_cache=share_cache,
                                expected_fingerprint=expected_fingerprint, actor=actor)
    else:
        result = train_and_register(data, store, config, run_id=run_id, on_epoch=on_epoch, share_cache=share_cache,
                                    expected_fingerprint=expected_fingerprint, actor=actor)
    if result["resumed_from_epoch"]:
        logger.info("run %s resumed from the checkpoint of epoch %d", run_id, result["resumed_from_epoch"])
    if history:  # empty when a retry resumed a run whose epochs were all done
        create_table_artifact(history, key="training-history",
                              description=f"per-epoch loss, holdout metrics and speed of run {run_id}")
    create_table_artifact([{"metric": k, "value": round(v, 4)} for k, v in result["metrics"].items()],
                          key="challenger-metrics", description=f"holdout metrics of {result['model_id']}")
    events.model_registered(result["model_id"], store, result["data_fingerprint"], result["metrics"])
    return result


def history_row(record: dict[str, Any]) -> dict[str, Any]:
    """One row of the training-history table: what a person compares between epochs."""
    return {"epoch": record["epoch"], "train_loss": round(record["train_loss"], 4),
            "holdout_loss": round(record["holdout_loss"], 4),
            "holdout_f1_samples": round(record["holdout_f1_samples"], 4),
            "holdout_f1_macro": round(record["holdout_f1_macro"], 4),
            "images_per_s": round(record["train_images_per_s"], 1), "lr": float(f"{record['lr']:.3g}")}
