"""The drift contract over the real labels file: few false alarms on undrifted samples, every
real shift caught. The statistic is scored on thousands of random subsamples at once (it is pure
numpy); a few samples also go through `protein validate` to show the CLI gives the same verdict."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from protein.cli import main
from protein.labels import parse_label_set
from protein.validation import ValidationConfig
from protein.validation.drift import REFERENCE_PROFILE, drift_test, indicator_matrix, profile_shares
from tests.helpers import REAL, write_png

SEEDS = 1000
DETECT_SEEDS = 200
CENTROSOME, NUCLEOPLASM = 8, 4
DEFAULTS = ValidationConfig()


@pytest.fixture(scope="module")
def real() -> tuple[list[tuple[str, frozenset[int]]], np.ndarray]:
    lines = (REAL / "train.csv").read_text().splitlines()[1:]
    rows = [(line.split(",")[0], parse_label_set(line.split(",")[1])) for line in lines]
    assert len(rows) == 19_236
    return rows, indicator_matrix([s for _, s in rows])


def reference() -> tuple[np.ndarray, int]:
    return profile_shares(REFERENCE_PROFILE), REFERENCE_PROFILE["n"]


def random_samples(rng: np.random.Generator, population: np.ndarray, n: int, seeds: int) -> np.ndarray:
    return np.stack([rng.choice(population, n, replace=False) for _ in range(seeds)])


def shifted_samples(rng: np.random.Generator, matrix: np.ndarray, class_id: int, share: float, n: int,
                    seeds: int) -> np.ndarray:
    """Samples of n real rows in which `class_id` has the given share (rows drawn with and without it)."""
    has = np.flatnonzero(matrix[:, class_id] == 1)
    lacks = np.flatnonzero(matrix[:, class_id] == 0)
    k = round(n * share)
    return np.concatenate([random_samples(rng, has, k, seeds), random_samples(rng, lacks, n - k, seeds)], axis=1)


def flag_rate(matrix: np.ndarray, samples: np.ndarray) -> tuple[float, np.ndarray]:
    shares, ref_n = reference()
    counts = matrix[samples].sum(axis=1)  # (seeds, 14)
    result = drift_test(shares, ref_n, counts, samples.shape[1], DEFAULTS.drift_alpha,
                        DEFAULTS.drift_min_relative_change, DEFAULTS.drift_min_absolute_change)
    return float(result.any_flagged.mean()), result.flagged


@pytest.mark.parametrize("n", [200, 500, 2000])
def test_random_real_subsamples_rarely_alarm(real, n: int) -> None:
    _, matrix = real
    rate, _ = flag_rate(matrix, random_samples(np.random.default_rng(n), np.arange(len(matrix)), n, SEEDS))
    assert rate <= DEFAULTS.drift_alpha, f"false-alarm rate {rate:.3f} at {n} rows"


@pytest.mark.parametrize("case,class_id,share", [
    ("rare class vanishes", CENTROSOME, 0.0),
    ("rare class halves", CENTROSOME, REFERENCE_PROFILE["class_share"][CENTROSOME] / 2),
    ("majority class drops to 25%", NUCLEOPLASM, 0.25),
])
def test_real_shifts_at_2000_rows_are_always_caught(real, case: str, class_id: int, share: float) -> None:
    _, matrix = real
    samples = shifted_samples(np.random.default_rng(class_id), matrix, class_id, share, 2000, DETECT_SEEDS)
    rate, flagged = flag_rate(matrix, samples)
    assert rate == 1.0, f"{case}: detected in {rate:.1%} of samples"
    assert flagged[:, class_id].all(), f"{case}: flagged, but not always on class {class_id}"


def test_nucleoplasm_47_to_38_percent_at_10000_rows_is_caught(real) -> None:
    # 9 points: below the 25 % relative floor (11.8 points) that alone would hide it, above the
    # 5-point absolute rule that common classes get.
    _, matrix = real
    samples = shifted_samples(np.random.default_rng(38), matrix, NUCLEOPLASM, 0.38, 10_000, 50)
    rate, flagged = flag_rate(matrix, samples)
    assert rate == 1.0 and flagged[:, NUCLEOPLASM].all(), f"detected in {rate:.1%} of samples"


def test_old_data_plus_new_rows_without_a_class_is_caught_in_the_new_rows(real) -> None:
    """The whole real set plus 2,000 new rows in which Centrosome vanished: diluted by the old
    rows the whole set stays within bounds; the new rows, compared on their own, never do."""
    _, matrix = real
    shares, ref_n = reference()
    rng = np.random.default_rng(2000)
    lacks = np.flatnonzero(matrix[:, CENTROSOME] == 0)
    new = random_samples(rng, lacks, 2000, DETECT_SEEDS)  # (seeds, 2000)
    new_counts = matrix[new].sum(axis=1)
    whole = drift_test(shares, ref_n, matrix.sum(axis=0) + new_counts, len(matrix) + 2000, DEFAULTS.drift_alpha,
                       DEFAULTS.drift_min_relative_change, DEFAULTS.drift_min_absolute_change)
    added = drift_test(shares, ref_n, new_counts, 2000, DEFAULTS.drift_alpha, DEFAULTS.drift_min_relative_change,
                       DEFAULTS.drift_min_absolute_change)
    assert not whole.flagged[:, CENTROSOME].any()  # why the new rows need their own test
    assert added.flagged[:, CENTROSOME].all()


def test_a_tiny_wobble_on_a_huge_sample_is_not_drift() -> None:
    # Significant at a million rows, but a 5 % relative change is below the floor that matters.
    shares, ref_n = reference()
    counts = np.round(shares * 1_000_000)
    counts[NUCLEOPLASM] *= 1.05
    result = drift_test(shares, ref_n, counts, 1_000_000, 0.05, DEFAULTS.drift_min_relative_change,
                        DEFAULTS.drift_min_absolute_change)
    assert result.p_adjusted[NUCLEOPLASM] < 0.05 and not result.any_flagged


def write_sample(root: Path, rows: list[tuple[str, frozenset[int]]]) -> Path:
    """The sampled real rows with one tiny image each, hard-linked: thousands of files in a blink."""
    template = root.parent / f"{root.name}-template.png"
    write_png(template, 16)
    (root / "train").mkdir(parents=True)
    text = "Image,Label\n" + "".join(f"{i},{' '.join(map(str, sorted(s)))}\n" for i, s in rows)
    (root / "train.csv").write_text(text)
    for image_id, _ in rows:
        (root / "train" / f"{image_id}.png").hardlink_to(template)
    return root


def test_protein_validate_gives_the_same_verdicts(real, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows, matrix = real
    rng = np.random.default_rng(7)
    cases = {
        "clean-500": (random_samples(rng, np.arange(len(rows)), 500, 1)[0], 0),
        "clean-2000": (random_samples(rng, np.arange(len(rows)), 2000, 1)[0], 0),
        "centrosome-halved-2000": (shifted_samples(rng, matrix, CENTROSOME, REFERENCE_PROFILE["class_share"][
            CENTROSOME] / 2, 2000, 1)[0], 1),
    }
    for name, (picked, expected_exit) in cases.items():
        assert flag_rate(matrix, picked[None, :])[0] == expected_exit  # the pure verdict
        dataset = write_sample(tmp_path / name, [rows[i] for i in picked])
        # The verdict is the label shares': decoding 4,500 copies of one PNG (through a worker pool) adds
        # seconds and nothing to it. The pixel checks have their own tests (tests/data/test_validation.py).
        code = main(["validate", "--data", str(dataset), "--store", str(tmp_path / "store"), "--headers-only",
                     "--image-size", "16", "--report", str(tmp_path / f"{name}-report")])
        out, err = capsys.readouterr()
        assert code == expected_exit, (name, err)
        report = json.loads((tmp_path / f"{name}-report" / "report.json").read_text())
        drift = [f for f in report["failures"] if f["suite"] == "distribution"]
        assert bool(drift) == bool(expected_exit), (name, report["failures"])
        if expected_exit:
            assert "class 8 Centrosome" in err and [f["suite"] for f in report["failures"]] == ["distribution"]
