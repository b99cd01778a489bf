"""The promotion gate: which rows a fair comparison may use, and a pure decision over two
evaluations on those rows and a GateConfig."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from protein.config import GateConfig
from protein.errors import EvidenceRefused
from protein.evaluation.bootstrap import PerImage, bootstrap
from protein.labels import LABELS


def ids_digest(ids: Iterable[str]) -> str:
    """sha256 of the sorted ids, one per line: names a row set in a record without listing it."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


@dataclass(frozen=True)
class GateRows:
    """The rows both models are scored on, and where they come from."""

    ids: tuple[str, ...]  # sorted
    selection: str  # how they were chosen, for a person
    from_champion_holdout: int = 0  # rows the champion held out when it trained
    new: int = 0  # rows the champion's training data did not have at all
    excluded: int = 0  # rows of the challenger's holdout dropped because the champion trained on them
    copies: int = 0  # rows dropped because a model trained on the same image bytes under another id
    problem: str | None = None  # set when no fair row set can be built

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ids": list(self.ids), "n": len(self.ids), "sha256": ids_digest(self.ids)}


def _trained_copies(rows: set[str], trained: Iterable[str], digest_of: Mapping[str, str] | None) -> set[str]:
    """The rows whose image bytes equal those of a row in `trained` (ids of the current data only:
    a trained id since removed from the data has no digest here)."""
    if not digest_of:
        return set()
    seen = {digest_of[i] for i in trained if i in digest_of}
    return {i for i in rows if digest_of.get(i) in seen}


def _copies_note(copies: int) -> str:
    return (f"; {copies} rows dropped because a model trained on the same image bytes under another id"
            if copies else "")


def select_rows(challenger_holdout: Iterable[str], champion_train: Iterable[str] | None = None,
                champion_holdout: Iterable[str] | None = None, has_champion: bool = False,
                challenger_train: Iterable[str] = (), digest_of: Mapping[str, str] | None = None) -> GateRows:
    """Rows neither model trained on: the challenger's holdout minus the champion's training rows,
    and minus every row whose image bytes (`digest_of`: id -> content digest) either model trained
    on under another id.

    On unchanged data with the same split this is the shared holdout. After a data change it is
    the champion's own holdout plus the rows that are new since the champion, both minus what
    the challenger trained on. champion_train None with has_champion means the champion's
    training rows cannot be known; the gate then refuses to compare.
    """
    holdout = set(challenger_holdout)
    challenger_train = list(challenger_train)
    if not has_champion:
        copies = _trained_copies(holdout, challenger_train, digest_of)
        kept = holdout - copies
        selection = f"the challenger's holdout ({len(holdout)} rows){_copies_note(len(copies))}"
        return GateRows(tuple(sorted(kept)), selection, copies=len(copies))
    if champion_train is None:
        return GateRows((), "none", problem="the champion's training rows are unknown (its model.json records "
                        "neither its rows nor a fingerprint of the current data), so no row is known to be "
                        "unseen by it")
    trained = set(champion_train)
    kept = holdout - trained
    excluded = len(holdout) - len(kept)
    copies = _trained_copies(kept, [*challenger_train, *trained], digest_of)
    kept -= copies
    seen_held_out = set(champion_holdout or ())
    in_champion_holdout = len(kept & seen_held_out)
    new = len(kept - seen_held_out)
    selection = (f"{len(kept)} rows neither model trained on: {in_champion_holdout} from the champion's holdout, "
                 f"{new} new since the champion; {excluded} rows of the challenger's holdout dropped because "
                 f"the champion trained on them{_copies_note(len(copies))}")
    return GateRows(tuple(sorted(kept)), selection, in_champion_holdout, new, excluded, len(copies))


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str]
    metric: str
    challenger_score: float
    champion_score: float | None
    gain: float | None
    class_deltas: dict[str, float] = field(default_factory=dict)  # challenger F1 - champion F1
    rows: dict[str, Any] = field(default_factory=dict)  # n, sha256 and selection of the scored rows
    score_interval: dict[str, Any] | None = None  # bootstrap interval of the challenger's score
    gain_interval: dict[str, Any] | None = None  # paired bootstrap interval of the gain

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rows_summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    rows = evaluation.get("rows", {})
    return {k: rows[k] for k in ("n", "sha256", "selection", "from_champion_holdout", "new", "excluded", "copies",
                                            "problem")
            if k in rows}


def decide(challenger: dict[str, Any], champion: dict[str, Any] | None, config: GateConfig) -> GateDecision:
    """Promote only if the challenger clears the minimum score and, against a champion, on at
    least min_rows rows neither model trained on, the lower bound of the paired bootstrap
    interval of its gain clears min_gain and no class present in those rows loses more than
    max_class_drop F1. Both evaluations must come from the same rows."""
    score = float(challenger[config.metric])
    reasons: list[str] = []
    passed = True
    if score < config.min_score:
        passed = False
        reasons.append(f"{config.metric} {score:.4f} is below the minimum {config.min_score:.4f}")
    else:
        reasons.append(f"{config.metric} {score:.4f} clears the minimum {config.min_score:.4f}")
    rows = _rows_summary(challenger)
    score_interval = None
    if challenger.get("per_image") and challenger["n_images"] > 0:
        score_interval = bootstrap(config.metric, PerImage.from_evaluation(challenger), None, config.resamples,
                                   config.confidence, config.bootstrap_seed).to_dict()

    if champion is None:
        reasons.append("no champion yet: the first model that clears the minimum is promoted")
        return GateDecision(passed, reasons, config.metric, score, None, None, rows=rows,
                            score_interval=score_interval)

    if challenger.get("rows", {}).get("sha256") != champion.get("rows", {}).get("sha256"):
        # Not retried (a retry compares the same evaluations again): the scores cannot be compared.
        raise EvidenceRefused("evaluations come from different rows: "
                              f"{challenger.get('rows', {}).get('sha256')} vs {champion.get('rows', {}).get('sha256')}")
    problem = challenger["rows"].get("problem")
    n_rows = int(challenger["rows"]["n"])
    if problem:
        reasons.append(f"no fair comparison: {problem}; the champion stays (promote by hand after checking)")
        return GateDecision(False, reasons, config.metric, score, None, None, rows=rows)
    if n_rows < config.min_rows:
        # With no row at all the champion was not scored; with a few it was, but a gain on them is noise.
        champion_score = float(champion[config.metric]) if config.metric in champion else None
        reasons.append(f"only {n_rows} rows neither model trained on, fewer than the {config.min_rows} needed to "
                       f"tell a gain from noise ({rows.get('selection', '')}); the champion stays")
        return GateDecision(False, reasons, config.metric, score, champion_score,
                            None if champion_score is None else score - champion_score, rows=rows)
    champion_score = float(champion[config.metric])

    interval = bootstrap(config.metric, PerImage.from_evaluation(challenger), PerImage.from_evaluation(champion),
                         config.resamples, config.confidence, config.bootstrap_seed)
    gain = score - champion_score
    span = (f"gain over the champion {gain:+.4f} (champion {champion_score:.4f}), "
            f"{interval.confidence:.0%} interval [{interval.low:+.4f}, {interval.high:+.4f}] on {n_rows} rows")
    if interval.low < config.min_gain:
        passed = False
        reasons.append(f"{span}: its lower bound is below the required {config.min_gain:+.4f}")
    else:
        reasons.append(f"{span}: its lower bound clears the required {config.min_gain:+.4f}")

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
    return GateDecision(passed, reasons, config.metric, score, champion_score, gain, deltas, rows=rows,
                        score_interval=score_interval, gain_interval=interval.to_dict())
