"""The synthetic dataset generator: competition layout, determinism, label statistics, realism."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from protein.config import SynthConfig
from protein.errors import DataError
from protein.labels import NUM_CLASSES, parse_label_set
from protein.synth import SynthSummary, generate_dataset, plan, render_image, sample_label_sets

# From /work/shared/data/README.md: share of real train images with each class, in percent.
REAL_CLASS_SHARE = np.array([10.9, 9.1, 13.2, 10.3, 47.1, 5.8, 29.7, 13.7, 5.4, 6.6])
# Share of real train images with one, two, three and four labels, in percent.
REAL_LABELS_PER_IMAGE = np.array([55.3, 37.9, 6.4, 0.3])

SMALL = SynthConfig(train=10, test=4, size=64, seed=3)


def read_rows(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["Image", "Label"]
        return [(row[0], row[1]) for row in reader]


def snapshot(folder: Path, truth: Path | None = None) -> dict[str, bytes]:
    """Relative path -> bytes for every file under folder, plus the truth file as "TRUTH"."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if truth is not None:
        files["TRUTH"] = truth.read_bytes()
    return files


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    out = tmp_path_factory.mktemp("synth") / "data"
    return generate_dataset(SMALL, out)


def test_layout_matches_the_competition(small_dataset: SynthSummary) -> None:
    out = small_dataset.out
    assert sorted(p.name for p in out.iterdir()) == ["sample_submission.csv", "test", "train", "train.csv"]
    assert (small_dataset.train, small_dataset.test) == (SMALL.train, SMALL.test)

    train = read_rows(out / "train.csv")
    submission = read_rows(out / "sample_submission.csv")
    truth = read_rows(small_dataset.truth)
    assert len(train) == SMALL.train and len(submission) == SMALL.test
    assert all(label == "0" for _, label in submission)
    assert [i for i, _ in truth] == [i for i, _ in submission]
    for _, label in train + truth:
        assert parse_label_set(label)
    for _, label in truth:
        assert label == " ".join(sorted(label.split(), key=int))

    train_ids = [i for i, _ in train]
    test_ids = [i for i, _ in submission]
    ids = train_ids + test_ids
    assert len(set(ids)) == len(ids)
    assert all(i.isdigit() and (i == "0" or not i.startswith("0")) for i in ids)
    assert sorted(p.stem for p in (out / "train").iterdir()) == sorted(train_ids)
    assert sorted(p.stem for p in (out / "test").iterdir()) == sorted(test_ids)

    for image_id in train_ids[:3] + test_ids[:2]:
        split = "train" if image_id in train_ids else "test"
        with Image.open(out / split / f"{image_id}.png") as image:
            assert image.format == "PNG"
            assert image.mode == "RGB"
            assert image.size == (SMALL.size, SMALL.size)
            assert np.asarray(image).dtype == np.uint8

    # The hidden truth lies beside the dataset, never inside it.
    assert small_dataset.truth == out.parent / f"{out.name}-test-labels.csv"
    assert not small_dataset.truth.is_relative_to(out)


def test_same_seed_same_bytes_and_workers_do_not_matter(tmp_path: Path, small_dataset: SynthSummary) -> None:
    again = generate_dataset(SMALL, tmp_path / "again")
    parallel = generate_dataset(dataclasses.replace(SMALL, workers=2), tmp_path / "parallel")
    other = generate_dataset(dataclasses.replace(SMALL, seed=SMALL.seed + 1), tmp_path / "other")

    reference = snapshot(small_dataset.out, small_dataset.truth)
    assert snapshot(again.out, again.truth) == reference
    assert snapshot(parallel.out, parallel.truth) == reference
    different = snapshot(other.out, other.truth)
    assert different["train.csv"] != reference["train.csv"]
    first_png = sorted((other.out / "train").iterdir())[0].read_bytes()
    assert first_png not in reference.values()


def test_progress_counts_every_image(tmp_path: Path) -> None:
    done: list[int] = []
    generate_dataset(dataclasses.replace(SMALL, train=5, test=2), tmp_path / "d", progress=done.append)
    assert sum(done) == 7


def test_label_sets_follow_the_real_distribution() -> None:
    sets = sample_label_sets(20_000, np.random.default_rng(0))
    share = np.array([sum(c in s for s in sets) for c in range(NUM_CLASSES)]) / len(sets) * 100
    np.testing.assert_allclose(share, REAL_CLASS_SHARE, atol=1.5)
    per_image = np.bincount([len(s) for s in sets], minlength=5)[1:5] / len(sets) * 100
    np.testing.assert_allclose(per_image, REAL_LABELS_PER_IMAGE, atol=1.5)
    assert all(s and s <= set(range(NUM_CLASSES)) for s in sets)


def green_inside_nuclei(labels: set[int], seed: int) -> tuple[float, float, float]:
    """(share of green mass on nuclei, mean green on nuclei, mean green elsewhere)."""
    rgb = render_image(frozenset(labels), 128, np.random.default_rng(seed)).astype(np.float64)
    nuclei = rgb[..., 2] > 40
    green = rgb[..., 1]
    return green[nuclei].sum() / max(green.sum(), 1.0), green[nuclei].mean(), green[~nuclei].mean()


@pytest.mark.parametrize("seed", range(4))
def test_green_follows_the_labelled_compartment(seed: int) -> None:
    share, inside, outside = green_inside_nuclei({4}, seed)  # nucleoplasm
    # Densely packed cells have far more cytoplasm than nucleus, and dim fields leave the stain
    # near the unspecific background: per pixel the nucleus still stands out clearly.
    assert share > 0.4 and inside > 4 * outside
    for cytoplasmic in ({6}, {7}):  # cytosol, plasma membrane
        share, inside, outside = green_inside_nuclei(cytoplasmic, seed)
        assert share < 0.3 and outside > inside


def test_images_look_like_the_real_ones_on_average() -> None:
    sets = sample_label_sets(24, np.random.default_rng(1))
    means = np.mean([render_image(s, 128, np.random.default_rng(i)).mean(axis=(0, 1)) for i, s in enumerate(sets)], 0)
    # Real images: mostly dark, mean RGB about [0.079, 0.053, 0.054].
    np.testing.assert_allclose(means / 255, [0.079, 0.053, 0.054], atol=0.035)


def test_label_noise_changes_recorded_labels_only(tmp_path: Path) -> None:
    clean = plan(dataclasses.replace(SMALL, train=400, test=100))
    noisy = plan(dataclasses.replace(SMALL, train=400, test=100, label_noise=0.3))
    assert clean.recorded == clean.true_sets
    assert noisy.true_sets == clean.true_sets and noisy.ids == clean.ids
    changed = np.mean([a != b for a, b in zip(noisy.recorded, noisy.true_sets, strict=True)])
    assert 0.2 < changed < 0.4
    assert all(s for s in noisy.recorded)

    a = generate_dataset(SMALL, tmp_path / "clean")
    b = generate_dataset(dataclasses.replace(SMALL, label_noise=0.3), tmp_path / "noisy")
    rows_a, rows_b = read_rows(a.out / "train.csv"), read_rows(b.out / "train.csv")
    assert [i for i, _ in rows_a] == [i for i, _ in rows_b]
    assert [parse_label_set(x) for _, x in rows_a] != [parse_label_set(x) for _, x in rows_b]
    # The images show the true labels, so they do not change with the noise.
    assert snapshot(a.out / "train") == snapshot(b.out / "train")


def test_multi_label_rows_are_often_out_of_order_as_in_the_real_train_csv() -> None:
    rows = plan(dataclasses.replace(SMALL, train=2000, test=0))
    multi = [cell for cell in rows.train_cells if " " in cell]
    unsorted = [cell for cell in multi if cell.split() != sorted(cell.split(), key=int)]
    assert 0.45 < len(unsorted) / len(multi) < 0.63  # real: 54 %
    assert [parse_label_set(c) for c in rows.train_cells] == rows.recorded


def test_refuses_to_overwrite_a_non_empty_folder(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        generate_dataset(SMALL, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp dirs or truth left behind


def test_truth_inside_the_dataset_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "data"
    with pytest.raises(DataError, match="outside"):
        generate_dataset(SMALL, out, truth=out / "truth.csv")
    assert not out.exists()


def test_an_empty_existing_folder_is_filled(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    summary = generate_dataset(dataclasses.replace(SMALL, train=2, test=1), out)
    assert (out / "train.csv").is_file() and summary.truth.is_file()


# --- a small reference model: the data must be learnable, and hard where the real data is ---------


def reference_features(rgb: np.ndarray) -> np.ndarray:
    """15 hand-made features of the green channel per compartment: levels, granularity, spots,
    rims, the perinuclear ring and the nucleoli. Deterministic and cheap."""
    from PIL import ImageFilter

    red, green, blue = (rgb[..., k].astype(np.float32) for k in range(3))
    green = green / max(float(np.percentile(green, 99.5)), 1.0)  # exposure varies per image
    nuclei = blue > 40
    cells = (red > 6) | nuclei
    cytoplasm = cells & ~nuclei

    def grown(mask: np.ndarray, size: int, grow: bool) -> np.ndarray:
        image = Image.fromarray(mask.astype(np.uint8) * 255)
        return np.asarray(image.filter(ImageFilter.MaxFilter(size) if grow else ImageFilter.MinFilter(size))) > 0

    smooth = Image.fromarray((np.clip(green, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(2))
    detail = green - np.asarray(smooth, np.float32) / 255
    ring = grown(nuclei, 7, True) & ~nuclei
    rim = cells & ~grown(cells, 5, False)
    nucleoli = nuclei & (blue < 0.75 * np.median(blue[nuclei])) if nuclei.any() else nuclei

    def mean(x: np.ndarray, mask: np.ndarray) -> float:
        return float(x[mask].mean()) if mask.any() else 0.0

    def std(x: np.ndarray, mask: np.ndarray) -> float:
        return float(x[mask].std()) if mask.any() else 0.0

    def spots(mask: np.ndarray) -> float:
        return float((green[mask] > 2 * np.median(green[mask]) + 0.1).mean()) if mask.any() else 0.0

    in_nuclei, in_cytoplasm = mean(green, nuclei), mean(green, cytoplasm)
    return np.array([
        in_nuclei, in_cytoplasm, mean(green, ~cells), in_nuclei / (in_cytoplasm + 0.05),
        std(detail, nuclei), std(detail, cytoplasm), spots(nuclei), spots(cytoplasm),
        mean(green, rim) - in_cytoplasm, mean(green, ring) - in_cytoplasm, mean(green, nucleoli) - in_nuclei,
        std(green, nuclei), std(green, cytoplasm), float(np.percentile(green[nuclei], 90)) if nuclei.any() else 0.0,
        mean(green, nucleoli),
    ])


def fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 1500, lr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest logistic regression by full-batch gradient descent (L2 1e-3): deterministic."""
    weights, bias = np.zeros((x.shape[1], y.shape[1])), np.zeros(y.shape[1])
    for _ in range(steps):
        error = 1 / (1 + np.exp(-(x @ weights + bias))) - y
        weights -= lr * (x.T @ error / len(x) + 1e-3 * weights)
        bias -= lr * error.mean(0)
    return weights, bias


# Classes the real data confuses with each other (nucleoplasm / speckles / nuclear bodies,
# nucleoli / fibrillar center, cytosol / plasma membrane) minus the majority class.
CONFUSABLE = (1, 2, 5, 7, 9)


def test_a_small_reference_model_beats_the_prior_clearly_but_is_far_from_perfect_per_class() -> None:
    from protein.evaluation.metrics import evaluate_predictions, prior_baseline, tune_thresholds

    n_train, n_test = 300, 150
    sets = sample_label_sets(n_train + n_test, np.random.default_rng(0))
    x = np.stack([reference_features(render_image(s, 128, np.random.default_rng(1000 + i)))
                  for i, s in enumerate(sets)])
    y = np.zeros((len(sets), NUM_CLASSES), dtype=bool)
    for i, label_set in enumerate(sets):
        y[i, list(label_set)] = True
    x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    weights, bias = fit_logistic(x[:n_train], y[:n_train].astype(np.float64))
    probs = 1 / (1 + np.exp(-(x @ weights + bias)))
    thresholds = tune_thresholds(probs[:n_train], y[:n_train])
    scores = evaluate_predictions(probs[n_train:], y[n_train:], thresholds)
    prior = evaluate_predictions(prior_baseline(y[:n_train], n_test), y[n_train:], 0.5)

    f1 = np.array(scores["per_class"]["f1"])
    share = y[n_train:].mean(0)
    always = 2 * share / (1 + share)  # F1 of predicting the class for every image
    assert min(scores["per_class"]["support"]) >= 8  # enough positives for a per-class claim
    assert scores["f1_samples"] > prior["f1_samples"] + 0.3, (scores["f1_samples"], prior["f1_samples"])
    assert np.all(f1 > always + 0.15), dict(enumerate(np.round(f1 - always, 3)))  # learnable, every class
    assert np.all(f1 < 0.96), dict(enumerate(np.round(f1, 3)))  # no class is solved
    assert np.all(f1[list(CONFUSABLE)] < 0.85), dict(enumerate(np.round(f1, 3)))
    assert scores["f1_macro"] < 0.8


def test_a_full_disk_during_synth_is_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """A PNG write that fills the disk raises ENOSPC naming no file; the CLI's line names the image."""
    import errno

    from protein.cli import main

    plain_write_bytes = Path.write_bytes

    def png_disk_full(path: Path, data: bytes) -> int:
        if path.suffix == ".png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return plain_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", png_disk_full)
    out = tmp_path / "ds"
    assert main(["synth", "--out", str(out), "--train", "2", "--test", "1", "--size", "16"]) == 2
    line, = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"protein synth: error: {tmp_path}/.ds.tmp-") and line.endswith(
        ".png: No space left on device"), line


def test_a_full_disk_during_a_csv_write_names_the_csv() -> None:
    """/dev/full accepts the open and fails the write (at flush or close) with ENOSPC, naming no file."""
    from protein.synth.dataset import _write_csv

    with pytest.raises(OSError) as raised:
        _write_csv(Path("/dev/full"), [("1", "0")] * 10_000)
    assert raised.value.filename == "/dev/full"
