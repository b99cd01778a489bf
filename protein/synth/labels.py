"""Label sets for synthetic rows: drawn from the real joint distribution, optionally perturbed."""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np

from protein.labels import NUM_CLASSES, parse_label_set

# In the real train.csv 4,673 of 19,236 rows (24%) list their labels out of ascending order,
# which is 54% of the multi-label rows; copying that keeps parsers honest about labels being sets.
UNSORTED_MULTI_LABEL_SHARE = 0.54


@functools.lru_cache(maxsize=1)
def _label_set_table() -> tuple[tuple[frozenset[int], ...], np.ndarray]:
    text = resources.files("protein").joinpath("label_sets.json").read_text(encoding="utf-8")
    counts: dict[str, int] = json.loads(text)
    sets = tuple(parse_label_set(key) for key in counts)
    weights = np.array(list(counts.values()), dtype=np.float64)
    return sets, weights / weights.sum()


def sample_label_sets(n: int, rng: np.random.Generator) -> list[frozenset[int]]:
    """Draw n label sets from the joint distribution of the real train set.

    Drawing whole sets (not classes one by one) keeps per-class frequency, labels per image
    and co-occurrence (e.g. nucleoplasm with cytosol) as in the real data.
    """
    sets, probs = _label_set_table()
    picks = rng.choice(len(sets), size=n, p=probs)
    return [sets[i] for i in picks]


def perturb_label_set(label_set: frozenset[int], rng: np.random.Generator) -> frozenset[int]:
    others = [c for c in range(NUM_CLASSES) if c not in label_set]
    ops = (["add", "swap"] if others else []) + (["drop"] if len(label_set) > 1 else [])
    if not ops:
        return label_set
    op = ops[rng.integers(len(ops))]
    current = sorted(label_set)
    if op == "add":
        return label_set | {others[rng.integers(len(others))]}
    if op == "drop":
        return label_set - {current[rng.integers(len(current))]}
    removed = current[rng.integers(len(current))]
    return (label_set - {removed}) | {others[rng.integers(len(others))]}


def label_cell(label_set: frozenset[int], rng: np.random.Generator) -> str:
    ordered = sorted(label_set)
    if len(ordered) > 1 and rng.random() < UNSORTED_MULTI_LABEL_SHARE:
        # A rotation is never ascending for a set of distinct ids, so the row really is unsorted.
        shift = int(rng.integers(1, len(ordered)))
        ordered = ordered[shift:] + ordered[:shift]
    return " ".join(str(c) for c in ordered)

