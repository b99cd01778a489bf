"""Train/holdout split that keeps every label's share close to the requested fraction.

Iterative stratification (Sechidis, Tsoumakas and Vlahavas, "On the stratification of multi-label
data", ECML PKDD 2011), the algorithm of the `iterative-stratification` and scikit-multilearn
packages. A plain random split leaves the rarest classes over- or under-represented in a holdout of
a few thousand images, which makes their per-class scores and tuned thresholds noisy.

Both splits take optional `groups`: rows with the same group (the same image content under two ids)
land in the same subset, so a model never holds out an image whose exact pixels it trained on.
"""

from __future__ import annotations

import numpy as np

# Desired counts are fractional (0.2 * count) and decremented by 1; values this close are equal.
_TIE_TOLERANCE = 1e-9


def _pick_subset(per_label: list[float], totals: list[float], rng: np.random.Generator) -> int:
    """The subset that most wants this label, then the one that wants most rows, then a seeded draw."""
    best = max(per_label)
    candidates = [k for k, want in enumerate(per_label) if want >= best - _TIE_TOLERANCE]
    if len(candidates) > 1:
        best_total = max(totals[k] for k in candidates)
        candidates = [k for k in candidates if totals[k] >= best_total - _TIE_TOLERANCE]
    if len(candidates) > 1:
        return candidates[int(rng.integers(len(candidates)))]
    return candidates[0]


def _iterative_stratification(labels: np.ndarray, proportions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool (N, L) labels -> int64 (N,) subset index per row, for K subsets of the given proportions."""
    n_rows, _ = labels.shape
    n_subsets = proportions.size
    subset_of = np.full(n_rows, -1, dtype=np.int64)
    unassigned = np.ones(n_rows, dtype=bool)
    wanted_rows = (proportions * n_rows).tolist()  # (K,) rows each subset still wants
    wanted_labels = np.outer(proportions, labels.sum(axis=0))  # (K, L) examples of each label still wanted
    remaining = labels.sum(axis=0).astype(np.int64)  # (L,) unassigned examples of each label

    while remaining.any():
        # The rarest label first: its few examples are the ones a greedy pass would otherwise strand.
        fewest = remaining[remaining > 0].min()
        rarest = np.flatnonzero(remaining == fewest)
        label = int(rarest[rng.integers(rarest.size)]) if rarest.size > 1 else int(rarest[0])
        rows = np.flatnonzero(labels[:, label] & unassigned)

        # Within one label's batch only that label's column and the row totals steer the choice,
        # so the sequential part is a scalar loop and the other labels are updated once afterwards.
        per_label = wanted_labels[:, label].tolist()
        chosen = np.empty(rows.size, dtype=np.int64)
        for i in range(rows.size):
            subset = _pick_subset(per_label, wanted_rows, rng)
            chosen[i] = subset
            per_label[subset] -= 1.0
            wanted_rows[subset] -= 1.0

        subset_of[rows] = chosen
        unassigned[rows] = False
        for subset in range(n_subsets):
            wanted_labels[subset] -= labels[rows[chosen == subset]].sum(axis=0)
        remaining -= labels[rows].sum(axis=0)

    # Rows with no label carry no stratification constraint: they only even out the subset sizes.
    for row in np.flatnonzero(unassigned):
        subset = _pick_subset(wanted_rows, wanted_rows, rng)
        subset_of[row] = subset
        wanted_rows[subset] -= 1.0
    return subset_of


def _group_leaders(groups: np.ndarray | None, n_rows: int) -> np.ndarray:
    """int64 (N,) the first row of each row's group; arange(N) (every row alone) without groups."""
    if groups is None:
        return np.arange(n_rows, dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != (n_rows,):
        raise ValueError(f"expected groups of shape ({n_rows},), got {groups.shape}")
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return first[inverse].astype(np.int64)


def iterative_stratified_split(
    targets: np.ndarray, holdout_fraction: float, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split rows of multi-hot (N, L) targets into (train_idx, holdout_idx) by iterative stratification.

    Returns sorted, disjoint int64 index arrays covering all rows, both non-empty, the holdout
    holding about `holdout_fraction` of the rows and of each label. Deterministic for a given seed.
    Rows with equal `groups` values go where the group's first row goes; without groups, or with
    every group a single row, the split is exactly the ungrouped one.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"expected holdout_fraction strictly between 0 and 1, got {holdout_fraction}")
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"expected targets to be 2-D (rows, labels), got shape {targets.shape}")
    if targets.shape[0] < 2:
        raise ValueError(f"expected at least 2 rows to split, got {targets.shape[0]}")
    if targets.dtype != np.bool_ and not np.all((targets == 0) | (targets == 1)):
        raise ValueError("expected targets to hold only 0/1 or booleans")

    rng = np.random.default_rng(seed)
    n_rows = targets.shape[0]
    # The algorithm deals a label's rows in order; shuffling first makes the seed choose the split
    # rather than the file order (as iterative-stratification's shuffle-split does).
    order = rng.permutation(n_rows)
    proportions = np.array([1.0 - holdout_fraction, holdout_fraction])
    subset_of = np.empty(n_rows, dtype=np.int64)
    subset_of[order] = _iterative_stratification(targets[order].astype(bool), proportions, rng)
    # Copies follow their group's first row after the stratified pass, rather than being dealt as
    # one unit, so the rng draws, and with them every split of data without copies, stay the same.
    leaders = _group_leaders(groups, n_rows)
    subset_of = subset_of[leaders]

    # An empty side is useless downstream (nothing to train on, or nothing to score), which the
    # algorithm allows for tiny inputs: move one seeded row (with its copies) across.
    for subset in (0, 1):
        if not np.any(subset_of == subset):
            donors = np.flatnonzero(subset_of != subset)
            subset_of[leaders == leaders[donors[rng.integers(donors.size)]]] = subset
    if not (np.any(subset_of == 0) and np.any(subset_of == 1)):
        raise ValueError(f"expected at least 2 distinct images to split, got {n_rows} rows of one image")

    train_idx = np.flatnonzero(subset_of == 0).astype(np.int64)
    holdout_idx = np.flatnonzero(subset_of == 1).astype(np.int64)
    return train_idx, holdout_idx


def iterative_stratified_folds(targets: np.ndarray, folds: int, seed: int,
                               groups: np.ndarray | None = None) -> np.ndarray:
    """int64 (N,) fold number 0..folds-1 of every row: K parts of equal size, each holding about
    1/K of each label. Deterministic for a given seed; fold k's rows are the holdout of model k.
    Rows with equal `groups` values share their group's first row's fold, as in the split."""
    targets = np.asarray(targets)
    if targets.ndim != 2:
        raise ValueError(f"expected targets to be 2-D (rows, labels), got shape {targets.shape}")
    if not 2 <= folds <= targets.shape[0]:
        raise ValueError(f"expected 2 <= folds <= {targets.shape[0]} rows, got {folds}")
    if targets.dtype != np.bool_ and not np.all((targets == 0) | (targets == 1)):
        raise ValueError("expected targets to hold only 0/1 or booleans")
    rng = np.random.default_rng(seed)
    order = rng.permutation(targets.shape[0])
    fold_of = np.empty(targets.shape[0], dtype=np.int64)
    fold_of[order] = _iterative_stratification(targets[order].astype(bool), np.full(folds, 1.0 / folds), rng)
    leaders = _group_leaders(groups, targets.shape[0])
    fold_of = fold_of[leaders]
    # Tiny inputs can leave a fold empty; give it one row (with its copies) from the largest fold.
    for fold in range(folds):
        if not np.any(fold_of == fold):
            largest = int(np.bincount(fold_of, minlength=folds).argmax())
            donors = np.flatnonzero(fold_of == largest)
            fold_of[leaders == leaders[donors[rng.integers(donors.size)]]] = fold
    if np.unique(fold_of).size < folds:
        raise ValueError(f"expected at least {folds} distinct images for {folds} folds; copies left a fold empty")
    return fold_of
