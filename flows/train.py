"""train: the training step alone, deployed on the GPU work pool and called by retrain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.params import TrainParams, route_library_logs
from protein.locations import default_store_uri
from protein.modeling.devices import DevicePolicy
from tasks.liveness import pulsing
from tasks.training import train_model


@flow(name="train", flow_run_name="train-{run_id}")
def train(data: str, run_id: str, store: str | None = None, train: TrainParams = TrainParams(),
          allow_cpu: bool = False, expected_fingerprint: str | None = None,
          pulse_seconds: float | None = None) -> dict[str, Any]:
    """Train and register a challenger under run_id (a rerun with the same run_id resumes).

    Args:
        data: dataset as the worker sees it: a folder, the competition zip, s3://bucket/prefix/ or
            s3://bucket/key.zip
        run_id: the training run's id; its checkpoint in the store is resumed when present
        store: model store: a local folder or s3://bucket/prefix; empty takes the worker's
            PROTEIN_STORE (default work/store)
        train: how to train the challenger
        allow_cpu: train on CPU when the worker has no CUDA GPU (the gpu pool refuses otherwise;
            a worker may also allow it with PROTEIN_ALLOW_CPU=1)
        expected_fingerprint: the data fingerprint validation saw (retrain passes it); other data
            fails the run instead of being trained on
        pulse_seconds: send a protein.flow-run.pulse event this often while training (the dispatch
            that started this run sets it from its lost-after bound); empty: none
    """
    if refused := train.refusal():  # before any data is read or decoded
        return refused
    with pulsing(pulse_seconds):
        route_library_logs()
        # Which checkout ran: on a worker host this is the pull step's clone of the pinned commit.
        get_run_logger().info("train flow code: %s", Path(__file__).resolve())
        policy = DevicePolicy.from_env(allow_cpu=allow_cpu)  # read on the worker at run time
        return train_model(data, store or default_store_uri(), train.to_config(), run_id, train.share_cache, policy,
                           expected_fingerprint, train.nproc)
