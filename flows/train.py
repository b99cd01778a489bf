"""train: the training step alone, deployed on the GPU work pool and called by retrain."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import TrainParams, default_store
from tasks.training import train_model


@flow(name="train", flow_run_name="train-{run_id}")
def train(data: str, run_id: str, store: str | None = None, train: TrainParams = TrainParams()) -> dict[str, Any]:
    """Train and register a challenger under run_id (a rerun with the same run_id resumes)."""
    return train_model(data, store or default_store(), train.to_config(), run_id, train.share_cache, train.nproc)
