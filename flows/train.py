"""train: the training step alone, deployed on the GPU work pool and called by retrain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import TrainParams, default_store, route_library_logs
from protein.devices import DevicePolicy
from tasks.training import train_model


@flow(name="train", flow_run_name="train-{run_id}")
def train(data: str, run_id: str, store: str | None = None, train: TrainParams = TrainParams(),
          allow_cpu: bool = False, expected_fingerprint: str | None = None) -> dict[str, Any]:
    """Train and register a challenger under run_id (a rerun with the same run_id resumes).

    `data` is a folder, zip or s3:// URI as the worker sees it; `expected_fingerprint` (retrain passes
    the validated one) makes the run fail instead of training on data that changed since. On the
    gpu pool (PROTEIN_REQUIRE_CUDA=1 in the deployment) a worker without CUDA fails the run unless
    `allow_cpu` or the worker's PROTEIN_ALLOW_CPU=1 says CPU is fine."""
    route_library_logs()
    # Which checkout ran: on a worker host this is the pull step's clone of the pinned commit.
    get_run_logger().info("train flow code: %s", Path(__file__).resolve())
    policy = DevicePolicy.from_env(allow_cpu=allow_cpu)  # read on the worker at run time
    return train_model(data, store or default_store(), train.to_config(), run_id, train.share_cache, policy,
                       expected_fingerprint, train.nproc)
