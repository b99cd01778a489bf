"""Tasks that score models for the gate, decide it and record the decision.

The library calls that load torch are imported in the task bodies: every retrain run imports
this module, and a run that trains nothing (a nightly on unchanged data, a superseded push, data
that fails validation) would otherwise spend 1.5-2.5 s of its start loading torch and torchvision.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from protein.config import GateConfig, TrainConfig
from protein.evaluation.data_order import DataOrder, judge_data_order
from protein.evaluation.gate import decide
from protein.evaluation.report import gate_markdown, per_class_rows
from protein.modeling.devices import DevicePolicy
from tasks import events
from tasks.retry import retry_transient
from tasks.training import device_for


@task(name="evaluate-model", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def evaluate_model(data: str, store: str, model_id: str, holdout_fraction: float, seed: int) -> dict[str, Any]:
    """Holdout metrics of one version on an explicit split, so challenger and champion are
    scored on exactly the same images."""
    from protein.pipeline import evaluate_version

    return evaluate_version(data, store, model_id, holdout_fraction, seed)


@task(name="evaluate-for-gate", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def evaluate_models(data: str, store: str, challenger_id: str, champion_id: str | None,
                    metric: str = "f1_samples", expected_fingerprint: str | None = None) -> dict[str, Any]:
    """Challenger and champion scored on the same rows, none of which either trained on, with
    thresholds tuned for the gate's metric; on the data the run validated."""
    from protein.pipeline import evaluate_for_gate

    return evaluate_for_gate(data, store, challenger_id, champion_id, metric=metric,
                             expected_fingerprint=expected_fingerprint)


@task(name="evaluate-for-gate-into-store", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def evaluate_models_into_store(data: str, store: str, run_id: str, challenger_id: str, champion_id: str | None,
                               policy: DevicePolicy, metric: str = "f1_samples") -> dict[str, Any]:
    """evaluate-for-gate on the host that runs the score deployment (the GPU's), its result kept
    under the run in the store for the retrain run to read."""
    from protein.run_results import score_for_gate

    device = device_for("auto", policy)
    get_run_logger().info("scoring %s and %s for the gate on %s (run %s)", challenger_id,
                          champion_id or "no champion", device, run_id)
    return score_for_gate(data, store, run_id, challenger_id, champion_id, device, metric=metric)


@task(name="check-challenger-split", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def check_challenger_split(data: str, store: str, challenger_id: str, config: TrainConfig,
                           data_fingerprint: str) -> None:
    """EvidenceRefused unless the challenger trained elsewhere declares the data, config, label
    profile and split this run validated and asked for."""
    from protein.pipeline.evaluation import verify_challenger_split

    verify_challenger_split(data, store, challenger_id, config, data_fingerprint)


@task(name="read-gate-evaluation", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def gate_evaluation_of_run(data: str, store: str, run_id: str, challenger_id: str, champion_id: str | None,
                           data_fingerprint: str, metric: str = "f1_samples") -> dict[str, Any]:
    """What the score deployment found, refused unless it scored these models on this data and
    this host derives the same verdict from its probabilities and agrees on a random sample."""
    from protein.run_results import read_gate_evaluation

    evaluation = read_gate_evaluation(data, store, run_id, challenger_id, champion_id, data_fingerprint,
                                      metric=metric)
    for name, checked in evaluation["spot_check"].items():
        get_run_logger().info("spot-check of the %s: %d rows scored on this host agree (max difference %.2g, "
                              "seed %d)", name, checked["rows"], checked["max_abs_diff"], checked["seed"])
    return evaluation


@task(name="gate", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def gate(store: str, challenger_id: str, champion_id: str | None, challenger_eval: dict[str, Any],
         champion_eval: dict[str, Any] | None, config: GateConfig, data_order: DataOrder | None = None,
         dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """The gate's decision, then the data-order rule (older data is not promoted without a
    person's flag), recorded in the store with the dataset the run resolved (``dataset``)."""
    from protein.pipeline import publish_training_plot, record_gate_decision

    decision = decide(challenger_eval, champion_eval, config).to_dict()
    if data_order is not None:
        decision = judge_data_order(decision, data_order)
    decision["dataset"] = dataset
    decision["record_uri"] = record_gate_decision(store, challenger_id, champion_id, decision, challenger_eval,
                                                  champion_eval)
    create_markdown_artifact(gate_markdown(decision, challenger_id, champion_id), key="gate-decision",
                             description="promotion gate decision and reasons")
    # A champion with no row it did not train on was not scored: nothing to compare per class.
    scored = champion_eval if champion_eval and "per_class" in champion_eval else None
    create_table_artifact(per_class_rows(challenger_eval, scored), key="per-class-comparison",
                          description=f"per-class scores on the gate's rows, {challenger_id} vs "
                                      f"{champion_id or 'no champion'}")
    plot_uri = publish_training_plot(store, challenger_id, challenger_eval, scored)
    create_link_artifact(plot_uri, link_text="training curves and per-class F1 (PNG)", key="training-plot",
                         description=f"open with `protein link {plot_uri}`")
    decision["plot_uri"] = plot_uri
    if not decision["promote"]:  # a promotion is reported by promote-model, once the pointer moved
        events.gate_decided(challenger_id, champion_id, store, False, decision["challenger_score"],
                            decision.get("champion_score"), decision["reasons"], dataset)
    return decision


@task(name="read-earlier-gate-decision", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def earlier_gate_decision(store: str, challenger_id: str) -> dict[str, Any] | None:
    """The decision the gate recorded for this challenger (None: never gated)."""
    from protein.pipeline.evaluation import earlier_gate_decision as recorded

    return recorded(store, challenger_id)


@task(name="withdraw-gate-pass", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def withdraw_gate_pass(store: str, challenger_id: str, why: str) -> None:
    """The gate passed, the promotion did not land: the records say so (protein.pipeline.evaluation)."""
    from protein.pipeline.evaluation import withdraw_gate_pass as withdraw

    withdraw(store, challenger_id, why)
