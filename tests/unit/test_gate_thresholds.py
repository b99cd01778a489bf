"""The gate scores each model with thresholds tuned on rows other than the ones it is scored on.

Two models with identical probabilities on the gate rows must tie. The challenger's shipped
thresholds were tuned on its whole holdout, which holds the gate rows; the champion's on rows of
its own. Scored with the shipped thresholds (what the gate did), in-sample tuning alone made the
challenger look 0.03-0.05 samples-F1 better, well past min_gain."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from protein.config import GateConfig
from protein.evaluation.bootstrap import to_bitmasks
from protein.evaluation.gate import decide
from protein.evaluation.metrics import binarize, evaluate_predictions
from protein.evaluation.thresholds import tune_for_metric
from protein.pipeline import evaluation

N_ROWS = 300


def noisy_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    targets = rng.random((n, 10)) < 0.15
    logits = (2.0 * targets - 1.0) * 1.2 + rng.normal(0.0, 1.4, (n, 10)) - 0.8
    return (1 / (1 + np.exp(-logits))).astype(np.float32), targets


class FixedPredictor:
    """A model version's predictions on the gate rows (the rows' positions stand in for images)."""

    image_size = 1

    def __init__(self, probs: np.ndarray, thresholds: np.ndarray) -> None:
        self.probs, self._thresholds = probs, thresholds

    @property
    def thresholds(self) -> np.ndarray:
        return self._thresholds

    def predict_probs(self, images: np.ndarray) -> np.ndarray:
        return self.probs[images[:, 0]]


def scored_with_shipped_thresholds(probs: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> dict[str, Any]:
    """What the gate computed before: evaluate_predictions at the model's shipped thresholds."""
    metrics = evaluate_predictions(probs, targets, thresholds)
    cut = np.asarray(metrics["thresholds"])
    return {**metrics, "per_image": {"pred": to_bitmasks(binarize(probs, cut, ensure_one=True)),
                                     "raw": to_bitmasks(probs > cut), "targets": to_bitmasks(targets)}}


@pytest.mark.parametrize("seed", [0, 3])
def test_identical_models_tie_although_one_was_tuned_on_the_gate_rows(seed: int, monkeypatch: pytest.MonkeyPatch):
    rng = np.random.default_rng(seed)
    probs, targets = noisy_scores(rng, N_ROWS)
    champion_rows_probs, champion_rows_targets = noisy_scores(rng, N_ROWS)
    shipped = {"challenger": tune_for_metric(probs, targets),  # tuned on its holdout: these very rows
               "champion": tune_for_metric(champion_rows_probs, champion_rows_targets)}  # on rows of its own
    ids = [str(i) for i in range(N_ROWS)]
    data = SimpleNamespace(train_ids=ids, targets=targets.astype(np.float32))
    monkeypatch.setattr(evaluation, "load_predictor",
                        lambda registry, model_id, cache_dir, device: FixedPredictor(probs, shipped[model_id]))
    monkeypatch.setattr(evaluation, "load_split_images", lambda *args, **kwargs: np.arange(N_ROWS)[:, None])
    same_rows = {"n": N_ROWS, "sha256": "the same rows"}

    # Tuning on the gate rows flips the decision: identical models, and the challenger is promoted.
    before = {name: {**scored_with_shipped_thresholds(probs, targets, shipped[name]), "rows": same_rows}
              for name in shipped}
    biased = decide(before["challenger"], before["champion"], GateConfig())
    assert biased.promote and biased.gain_interval["low"] > GateConfig().min_gain

    after = {name: {**evaluation._evaluate_rows(None, data, "fp", name, ids, None), "rows": same_rows}  # type: ignore[arg-type]
             for name in shipped}
    decision = decide(after["challenger"], after["champion"], GateConfig())
    assert not decision.promote and decision.gain == 0.0
    assert after["challenger"]["per_image"] == after["champion"]["per_image"]
    assert after["challenger"]["cross_fitted"] is True
    # The shipped thresholds are still recorded, for a person comparing them.
    assert after["challenger"]["thresholds"] == pytest.approx(shipped["challenger"].tolist())
