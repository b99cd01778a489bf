from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from protein.labels import encode_many, parse_label_set
from protein.split import iterative_stratified_folds, iterative_stratified_split

REAL_TRAIN_CSV = Path(__file__).resolve().parents[2].parent / "shared/data/real/train.csv"


@pytest.fixture(scope="module")
def real_targets() -> np.ndarray:
    frame = pd.read_csv(REAL_TRAIN_CSV, dtype=str)
    return encode_many(frame["Label"].map(parse_label_set))


def _random_multilabel(n_rows: int, n_labels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random((n_rows, n_labels)) < rng.uniform(0.05, 0.5, n_labels)).astype(np.float32)


def _assert_partition(train_idx: np.ndarray, holdout_idx: np.ndarray, n_rows: int) -> None:
    for idx in (train_idx, holdout_idx):
        assert idx.dtype == np.int64
        assert np.all(np.diff(idx) > 0)  # sorted, no repeats
    assert np.intersect1d(train_idx, holdout_idx).size == 0
    np.testing.assert_array_equal(np.union1d(train_idx, holdout_idx), np.arange(n_rows))


def test_split_is_a_sorted_partition():
    targets = _random_multilabel(500, 6, seed=0)
    train_idx, holdout_idx = iterative_stratified_split(targets, 0.2, seed=1)
    _assert_partition(train_idx, holdout_idx, 500)


def test_same_seed_same_split():
    targets = _random_multilabel(500, 6, seed=0)
    first = iterative_stratified_split(targets, 0.2, seed=7)
    second = iterative_stratified_split(targets, 0.2, seed=7)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])


def test_different_seeds_differ():
    targets = _random_multilabel(500, 6, seed=0)
    holdouts = [tuple(iterative_stratified_split(targets, 0.2, seed=s)[1]) for s in range(4)]
    assert len(set(holdouts)) == 4


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.5, 0.9])
def test_single_label_sizes_within_one_of_target(fraction):
    # One label per row: the label counts and the row count are the same constraint.
    rng = np.random.default_rng(3)
    targets = np.eye(5, dtype=np.float32)[rng.integers(0, 5, 333)]
    train_idx, holdout_idx = iterative_stratified_split(targets, fraction, seed=0)
    assert abs(holdout_idx.size - round(fraction * 333)) <= 1
    assert train_idx.size + holdout_idx.size == 333


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_unlabelled_rows_sizes_within_one_of_target(fraction):
    targets = np.zeros((101, 3))
    _, holdout_idx = iterative_stratified_split(targets, fraction, seed=0)
    assert abs(holdout_idx.size - round(fraction * 101)) <= 1


def test_every_row_the_same_label():
    targets = np.zeros((10, 4))
    targets[:, 2] = 1
    train_idx, holdout_idx = iterative_stratified_split(targets, 0.3, seed=0)
    _assert_partition(train_idx, holdout_idx, 10)
    assert holdout_idx.size == 3


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5, 0.95])
def test_two_rows_give_one_each(fraction):
    # The algorithm alone would put both rows on one side for a small fraction; neither side may be empty.
    train_idx, holdout_idx = iterative_stratified_split(np.array([[1, 0], [1, 1]]), fraction, seed=0)
    assert train_idx.size == 1
    assert holdout_idx.size == 1
    _assert_partition(train_idx, holdout_idx, 2)


def test_real_labels_every_class_within_one_point_of_fraction(real_targets):
    class_counts = real_targets.sum(axis=0)
    for seed in range(3):
        train_idx, holdout_idx = iterative_stratified_split(real_targets, 0.2, seed=seed)
        _assert_partition(train_idx, holdout_idx, real_targets.shape[0])
        share = real_targets[holdout_idx].sum(axis=0) / class_counts
        assert np.all(np.abs(share - 0.2) < 0.01), share


def test_real_labels_holdout_size_close_to_fraction(real_targets):
    # Multi-label rows let each label hit its quota while the row total drifts a little (up to 45
    # rows, 0.23% of 19,236, over seeds 0-19 on this file): the published algorithm balances labels,
    # not row counts.
    n_rows = real_targets.shape[0]
    for seed in range(3):
        _, holdout_idx = iterative_stratified_split(real_targets, 0.2, seed=seed)
        assert abs(holdout_idx.size - round(0.2 * n_rows)) <= 0.005 * n_rows


def test_real_labels_rare_classes_better_balanced_than_random(real_targets):
    class_counts = real_targets.sum(axis=0)
    rare = np.argsort(class_counts)[:3]
    n_rows = real_targets.shape[0]
    stratified_error, random_error = [], []
    for seed in range(5):
        _, holdout_idx = iterative_stratified_split(real_targets, 0.2, seed=seed)
        random_idx = np.random.default_rng(seed).permutation(n_rows)[: holdout_idx.size]
        for idx, errors in ((holdout_idx, stratified_error), (random_idx, random_error)):
            share = real_targets[idx][:, rare].sum(axis=0) / class_counts[rare]
            errors.append(np.abs(share - 0.2).mean())
    assert np.mean(stratified_error) < np.mean(random_error)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_fraction_outside_open_unit_interval_raises(fraction):
    with pytest.raises(ValueError, match="holdout_fraction"):
        iterative_stratified_split(np.ones((10, 2)), fraction, seed=0)


def test_fewer_than_two_rows_raises():
    with pytest.raises(ValueError, match="at least 2 rows"):
        iterative_stratified_split(np.ones((1, 2)), 0.5, seed=0)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="2-D"):
        iterative_stratified_split(np.ones(10), 0.5, seed=0)
    with pytest.raises(ValueError, match="0/1"):
        iterative_stratified_split(np.full((4, 2), 0.3), 0.5, seed=0)


def test_k_folds_partition_rows_and_stratify_each_label():
    rng = np.random.default_rng(4)
    targets = rng.random((500, 10)) < np.array([0.4, 0.05, 0.1, 0.05, 0.4, 0.05, 0.3, 0.1, 0.05, 0.05])
    fold_of = iterative_stratified_folds(targets, 5, seed=1)
    assert fold_of.shape == (500,) and set(fold_of.tolist()) == set(range(5))
    sizes = np.bincount(fold_of)
    assert sizes.max() - sizes.min() <= 2
    for fold in range(5):
        share = targets[fold_of == fold].sum(axis=0) / targets.sum(axis=0)
        assert np.all(np.abs(share - 0.2) < 0.05), (fold, share)
    assert np.array_equal(fold_of, iterative_stratified_folds(targets, 5, seed=1))
    assert not np.array_equal(fold_of, iterative_stratified_folds(targets, 5, seed=2))


def test_k_folds_leave_no_fold_empty_on_tiny_input():
    fold_of = iterative_stratified_folds(np.eye(3, dtype=bool)[[0, 0, 0, 1]], 4, seed=0)
    assert sorted(fold_of.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="folds"):
        iterative_stratified_folds(np.eye(3, dtype=bool), 4, seed=0)


# The splits iterative_stratified_split/_folds made before groups existed, of
# _random_multilabel(40, 5, seed=11): data without copies must keep exactly these.
SPLIT_BEFORE_GROUPS = {0: [5, 12, 13, 14, 15, 16, 25, 26, 27, 30], 1: [5, 8, 10, 14, 18, 21, 26, 30, 38, 39],
                       2: [0, 1, 4, 8, 19, 21, 25, 27, 31, 36]}
FOLDS_BEFORE_GROUPS = {
    0: [1, 3, 2, 3, 3, 0, 1, 3, 2, 3, 2, 3, 0, 1, 3, 2, 0, 1, 1, 0, 2, 2, 1, 0, 3, 0, 0, 1, 0, 2, 1, 1, 3, 0, 2, 2, 2,
        3, 0, 1],
    1: [2, 1, 1, 1, 3, 2, 3, 1, 2, 0, 2, 3, 3, 3, 1, 0, 1, 1, 1, 1, 2, 0, 2, 0, 1, 3, 2, 0, 3, 3, 0, 3, 0, 0, 2, 0, 3,
        2, 0, 2],
    2: [1, 0, 1, 3, 1, 0, 1, 0, 0, 2, 0, 3, 3, 3, 1, 2, 1, 3, 3, 1, 2, 2, 3, 2, 1, 1, 2, 3, 0, 3, 3, 2, 2, 2, 1, 0, 0,
        0, 2, 0],
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_data_without_copies_keeps_the_split_it_had_before_groups(seed: int):
    targets = _random_multilabel(40, 5, seed=11)
    for groups in (None, np.arange(40), np.array([f"digest-{i}" for i in range(40)])):
        assert iterative_stratified_split(targets, 0.25, seed, groups)[1].tolist() == SPLIT_BEFORE_GROUPS[seed]
        assert iterative_stratified_folds(targets, 4, seed, groups).tolist() == FOLDS_BEFORE_GROUPS[seed]


def test_copies_of_one_image_land_on_one_side_for_every_seed():
    """A push adds byte-identical copies of images under new ids: a model must not train on a copy
    and be scored on the original."""
    targets = _random_multilabel(120, 6, seed=5)
    groups = np.arange(120)
    copies = {3: [97], 10: [50, 111], 42: [43], 60: [119]}  # original row -> rows holding its bytes
    for original, rows in copies.items():
        groups[rows] = original
        targets[rows] = targets[original]  # a copy carries the original's labels, as a re-push would
    for seed in range(8):
        train_idx, holdout_idx = iterative_stratified_split(targets, 0.2, seed, groups)
        _assert_partition(train_idx, holdout_idx, 120)
        held_out = set(holdout_idx.tolist())
        fold_of = iterative_stratified_folds(targets, 5, seed, groups)
        for original, rows in copies.items():
            assert len({row in held_out for row in [original, *rows]}) == 1, (seed, original)
            assert len({int(fold_of[row]) for row in [original, *rows]}) == 1, (seed, original)


def test_copies_that_leave_no_second_image_cannot_be_split():
    with pytest.raises(ValueError, match="2 distinct images"):
        iterative_stratified_split(np.eye(3, dtype=bool)[[0, 1]], 0.5, seed=0, groups=np.array([7, 7]))
    fold_of = iterative_stratified_folds(np.eye(3, dtype=bool)[[0, 0, 0, 1]], 2, seed=0, groups=np.array([0, 0, 1, 1]))
    assert fold_of[0] == fold_of[1] and fold_of[2] == fold_of[3] and fold_of[0] != fold_of[2]


def test_trainings_of_the_same_data_started_in_the_same_second_get_run_ids_of_their_own(monkeypatch):
    """Two folds trained in a loop on a fast machine start within a second: with the second and the
    data fingerprint alone their run ids were equal, and the second fold resumed the first's finished
    checkpoint and returned its model."""
    import datetime as dt
    import types

    import protein.pipeline.inputs as inputs
    from protein.registry.records import check_run_id

    second = dt.datetime(2026, 12, 6, 15, 59, 8, tzinfo=dt.UTC)
    frozen = type("FrozenDatetime", (dt.datetime,), {"now": classmethod(lambda cls, tz=None: second)})
    monkeypatch.setattr(inputs, "dt", types.SimpleNamespace(datetime=frozen, UTC=dt.UTC))  # this module's clock only
    first, again = inputs.new_run_id("25a449cb" * 2), inputs.new_run_id("25a449cb" * 2)
    assert first != again
    assert first.startswith("20261206-155908-25a449cb-") and check_run_id(first) == first
