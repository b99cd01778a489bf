"""Scoring a submission against known labels (the synthetic set's hidden test truth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protein.data import parse_csv_bytes, parse_labels_table
from protein.errors import DataError
from protein.evaluation.metrics import evaluate_predictions, prior_baseline
from protein.labels import encode_many


def read_label_csv(path: Path) -> tuple[list[str], np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected an Image,Label CSV)")
    frame = parse_csv_bytes(path.read_bytes(), str(path))
    ids, label_sets = parse_labels_table(frame, str(path))
    return ids, encode_many(label_sets)


def score_submission(submission: Path, truth: Path, train_labels: Path | None = None) -> dict[str, Any]:
    """Metrics of a submission against the truth (same ids, any order); with train_labels,
    also the predict-the-prior baseline (each class's training frequency for every image)."""
    sub_ids, predicted = read_label_csv(submission)
    truth_ids, targets = read_label_csv(truth)
    if sorted(sub_ids) != sorted(truth_ids):
        missing = sorted(set(truth_ids) - set(sub_ids))[:5]
        extra = sorted(set(sub_ids) - set(truth_ids))[:5]
        raise DataError(f"{submission}: ids do not match {truth} (missing {missing}, unexpected {extra})")
    order = {image_id: i for i, image_id in enumerate(sub_ids)}
    predicted = predicted[[order[i] for i in truth_ids]]
    # Submissions are hard labels: score them as probabilities 0/1 at threshold 0.5.
    result: dict[str, Any] = {"model": evaluate_predictions(predicted, targets, 0.5)}
    if train_labels is not None:
        _, train_targets = read_label_csv(train_labels)
        prior = prior_baseline(train_targets, len(truth_ids))
        result["prior_baseline"] = evaluate_predictions(prior, targets, 0.5)
    return result
