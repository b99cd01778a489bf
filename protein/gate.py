"""The promotion gate: a pure function of a GateConfig and two holdout evaluations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from protein.config import GateConfig
from protein.labels import LABELS


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    metric: str
    challenger_score: float
    champion_score: float | None
    gain: float | None
    class_deltas: dict[str, float] = field(default_factory=dict)  # challenger F1 - champion F1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, config: GateConfig) -> GateDecision:
    """Promote only if the challenger clears the minimum score and, against a champion,
    gains at least min_gain on the gate metric without losing more than max_class_drop F1 on
    any class present in the holdout. Both evaluations must come from the same holdout."""
    score = float(challenger[config.metric])
    reasons: list[str] = []
    passed = True
    if score < config.min_score:
        passed = False
        reasons.append(f"{config.metric} {score:.4f} is below the minimum {config.min_score:.4f}")
    else:
        reasons.append(f"{config.metric} {score:.4f} clears the minimum {config.min_score:.4f}")

    if champion is None:
        reasons.append("no champion yet: the first model that clears the minimum is promoted")
        return GateDecision(passed, reasons, config.metric, score, None, None)

    if challenger.get("holdout") and champion.get("holdout") and challenger["holdout"] != champion["holdout"]:
        raise ValueError(f"evaluations come from different holdouts: {challenger['holdout']} vs {champion['holdout']}")
    champion_score = float(champion[config.metric])
    gain = score - champion_score
    if gain < config.min_gain:
        passed = False
        reasons.append(f"gain over the champion {gain:+.4f} is below the required {config.min_gain:+.4f} "
                       f"(champion {champion_score:.4f})")
    else:
        reasons.append(f"gain over the champion {gain:+.4f} meets the required {config.min_gain:+.4f}")

    deltas: dict[str, float] = {}
    new_f1 = challenger["per_class"]["f1"]
    old_f1 = champion["per_class"]["f1"]
    support = challenger["per_class"]["support"]
    for i, name in enumerate(LABELS[: len(new_f1)]):
        delta = float(new_f1[i]) - float(old_f1[i])
        deltas[name] = delta
        if support[i] > 0 and -delta > config.max_class_drop:
            passed = False
            reasons.append(f"class {i} {name} F1 drops {-delta:.4f} ({old_f1[i]:.4f} -> {new_f1[i]:.4f}), "
                           f"more than the allowed {config.max_class_drop:.4f}")
    if passed:
        reasons.append(f"no class drops more than {config.max_class_drop:.4f} F1")
    return GateDecision(passed, reasons, config.metric, score, champion_score, gain, deltas)
