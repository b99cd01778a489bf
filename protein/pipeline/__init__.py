"""The library's use cases, each one call: train and register, evaluate, predict.

The CLI and the Prefect tasks both call these, so a local run and an orchestrated run do
exactly the same work. Inputs are paths, URIs and configs; outputs are small JSON-able dicts.

inputs: run ids, the holdout split, decoded images; training: train and
register (one process or torchrun ranks); evaluation: scoring for the gate and its records;
prediction: the test-set submission and its publication.
"""

from protein.pipeline.evaluation import (
    earlier_gate_decision,
    evaluate_for_gate,
    evaluate_version,
    gate_rows,
    publish_training_plot,
    record_gate_decision,
    recorded_split,
    withdraw_gate_pass,
)
from protein.pipeline.inputs import (
    check_fingerprint,
    holdout_split,
    load_split_images,
    new_run_id,
    summarize,
    training_split,
)
from protein.pipeline.prediction import (
    TestSetPrediction,
    load_predictor,
    predict_and_publish,
    predict_test_set,
    publish_submission,
)
from protein.pipeline.training import (
    TrainingInputs,
    describe_weights,
    open_training_inputs,
    train_and_register,
    train_on_ranks,
    training_label_profile,
)

__all__ = [
    "TestSetPrediction", "TrainingInputs", "check_fingerprint",
    "describe_weights", "earlier_gate_decision", "evaluate_for_gate", "evaluate_version", "gate_rows", "holdout_split",
    "load_predictor", "load_split_images", "new_run_id", "open_training_inputs", "predict_and_publish",
    "predict_test_set", "publish_submission", "publish_training_plot", "record_gate_decision", "recorded_split",
    "summarize", "train_and_register", "train_on_ranks", "training_label_profile", "training_split",
    "withdraw_gate_pass",
]
