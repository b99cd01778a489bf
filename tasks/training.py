from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.concurrency.sync import concurrency

from protein.config import TrainConfig
from protein.pipeline import train_and_register, train_on_ranks
from protein.train import select_device

GPU_LIMIT = "gpu"


@task(name="train-model", retries=2, retry_delay_seconds=[10, 60], timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE)
def train_model(data: str, store: str, config: TrainConfig, run_id: str, share_cache: bool = False,
                nproc: int = 1) -> dict[str, Any]:
    """Train and register a challenger. A retry reuses run_id, so it resumes from the last
    epoch checkpoint in the store instead of starting over. nproc > 1 trains on that many
    processes under torchrun (the ranks log to this worker's stderr, not to Prefect)."""
    logger = get_run_logger()
    device = select_device(config.device)
    logger.info("training %s at %d px on device %s (run %s)", config.arch, config.image_size, device, run_id)
    if device.type == "cuda":
        import torch

        logger.info("GPU: %s; bf16 autocast and channels_last enabled", torch.cuda.get_device_name(device))
    progress_id = create_progress_artifact(0.0, key="training-progress", description=f"run {run_id}")

    def on_epoch(record: dict[str, Any]) -> None:
        update_progress_artifact(progress_id, 100.0 * record["epoch"] / record["epochs"],
                                 description=f"epoch {record['epoch']}/{record['epochs']}: "
                                 f"holdout F1 {record['holdout_f1_samples']:.3f}")
        logger.info("epoch %d/%d train_loss %.4f holdout_f1_samples %.4f (%.1f img/s)", record["epoch"],
                    record["epochs"], record["train_loss"], record["holdout_f1_samples"],
                    record["train_images_per_s"])

    # One slot per GPU: two retrains never share a card. Without a 'gpu' limit on the server
    # this does not block (strict=False), which is what local development wants.
    with concurrency(GPU_LIMIT, occupy=nproc, timeout_seconds=24 * 3600):
        if nproc > 1:
            result = train_on_ranks(nproc, data, store, config, run_id=run_id, share_cache=share_cache)
        else:
            result = train_and_register(data, store, config, run_id=run_id, on_epoch=on_epoch,
                                        share_cache=share_cache)
    create_table_artifact([{"metric": k, "value": round(v, 4)} for k, v in result["metrics"].items()],
                          key="challenger-metrics", description=f"holdout metrics of {result['model_id']}")
    return result
