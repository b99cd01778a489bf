"""score: the retrain's GPU-bound scoring steps, deployed on the gpu pool and called by retrain.

step 'gate' scores the challenger and the champion on the gate's rows; step 'predict' writes the
test-set submission of a model version. Both keep their result in the store under runs/<run_id>/,
where the retrain run on the CPU host reads it (a flow run's return value stays on this host)."""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from flows.params import route_library_logs
from protein.locations import default_store_uri
from protein.modeling.devices import DevicePolicy
from tasks.evaluation import evaluate_models_into_store
from tasks.liveness import pulsing
from tasks.prediction import predict_submission_for_run


@flow(name="score", flow_run_name="score-{step}-{run_id}")
def score(step: Literal["gate", "predict"], data: str, run_id: str, model: str, champion: str | None = None,
          store: str | None = None, allow_cpu: bool = False, pulse_seconds: float | None = None,
          metric: str = "f1_samples") -> dict[str, Any]:
    """Score for the retrain run `run_id` and keep the result under runs/<run_id>/ in the store.

    Args:
        step: gate (challenger and champion on the gate's rows) or predict (test-set submission)
        data: dataset as the worker sees it: a folder, the competition zip, s3://bucket/prefix/ or
            s3://bucket/key.zip
        run_id: the retrain's training run id; the result is kept under runs/<run_id>/
        model: the challenger (step gate) or the version whose submission is computed (predict)
        champion: the champion the challenger is scored against (step gate); empty when none
        store: model store: a local folder or s3://bucket/prefix; empty takes the worker's
            PROTEIN_STORE (default work/store)
        allow_cpu: score on CPU when the worker has no CUDA GPU (the gpu pool refuses otherwise;
            a worker may also allow it with PROTEIN_ALLOW_CPU=1)
        pulse_seconds: send a protein.flow-run.pulse event this often while scoring (the dispatch
            that started this run sets it from its lost-after bound); empty: none
        metric: the gate's metric (step gate), which each model's thresholds are tuned for
    """
    with pulsing(pulse_seconds):
        route_library_logs()
        policy = DevicePolicy.from_env(allow_cpu=allow_cpu)  # read on the worker at run time
        store = store or default_store_uri()
        if step == "gate":
            return evaluate_models_into_store(data, store, run_id, model, champion, policy, metric)
        return predict_submission_for_run(data, store, run_id, model, policy)
