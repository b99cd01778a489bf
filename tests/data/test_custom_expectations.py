"""GX evaluates each custom Expectation: with its `_validate` broken (always "success"), the same
data that failed passes. So the verdict is GX's, computed by the Expectation, not handed to it."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from protein.labels import parse_label_set
from protein.validation import REFERENCE_PROFILE, ValidationConfig, validate_dataset
from protein.validation.expectations import custom_expectations
from tests.data.corpus import FAULTS, SIZE, make_faulty, write_base
from tests.helpers import REAL, write_png

CONFIG = ValidationConfig(image_size=SIZE, max_image_bytes=200_000)
CENTROSOME = 8
# Synthetic images per set for the image-statistics test: at least ValidationConfig.min_rows_for_drift (200),
# and ample for a 15% shift (the z-test's standard error is ~1% of the mean at this size).
N_IMAGES = 240


def always_passes(self: Any, metrics: dict, runtime_configuration: dict | None = None,
                  execution_engine: Any = None) -> dict:
    return {"success": True, "result": {"observed_value": "broken on purpose"}}


def real_rows_without(class_id: int, n: int) -> list[tuple[str, frozenset[int]]]:
    rows = [(line.split(",")[0], parse_label_set(line.split(",")[1]))
            for line in (REAL / "train.csv").read_text().splitlines()[1:]]
    return [r for r in rows if class_id not in r[1]][:n]


def write_rows(root: Path, rows: list[tuple[str, frozenset[int]]], template: Path) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "train.csv").write_text("Image,Label\n" + "".join(
        f"{i},{' '.join(map(str, sorted(s)))}\n" for i, s in rows))
    for image_id, _ in rows:
        (root / "train" / f"{image_id}.png").hardlink_to(template)
    return root


def write_images(root: Path, n: int, seed: int, green_gain: float = 1.0) -> Path:
    """n synthetic 16x16 images whose brightness varies from image to image, like microscopy
    fields; green_gain scales the green channel (the protein stain)."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    lines = ["Image,Label"]
    for i in range(n):
        level = rng.uniform(30, 50)
        pixels = rng.normal(level, 10, (SIZE, SIZE, 3)).clip(0, 255)
        pixels[..., 1] = (pixels[..., 1] * green_gain).clip(0, 255)
        Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / "train" / f"img{i}.png")
        lines.append(f"img{i},{i % 10}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


def test_label_shares_expectation_decides_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template = tmp_path / "t.png"
    write_png(template, SIZE)
    dataset = write_rows(tmp_path / "ds", real_rows_without(CENTROSOME, 400), template)
    report = validate_dataset(dataset, CONFIG)
    (failure,) = report.failures
    assert failure["expectation"] == "expect_label_shares_within_reference_bounds"
    (moved,) = [e for e in failure["examples"] if e.get("class") == CENTROSOME]
    assert moved["observed"] == 0 and moved["reference"] == pytest.approx(REFERENCE_PROFILE["class_share"][8])
    assert moved["p_adjusted"] < 0.05

    cls = custom_expectations()["expect_label_shares_within_reference_bounds"]
    monkeypatch.setattr(cls, "_validate", always_passes)
    assert validate_dataset(dataset, CONFIG).success


def test_content_overlap_expectation_decides_leakage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fault = next(f for f in FAULTS if f.name == "test_content_in_train")
    dataset = make_faulty(write_base(tmp_path / "base"), tmp_path / "ds", fault)
    report = validate_dataset(dataset, CONFIG)
    assert [f["expectation"] for f in report.failures] == ["expect_no_content_overlap_between_splits"]
    assert report.failures[0]["examples"] == [{"file": "test/202.png", "row": 3, "value": "train/102.png"}]

    cls = custom_expectations()["expect_no_content_overlap_between_splits"]
    monkeypatch.setattr(cls, "_validate", always_passes)
    assert validate_dataset(dataset, CONFIG).success


@pytest.fixture(scope="module")
def image_reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The profile (with image statistics) of N_IMAGES synthetic images, as --accept would store it."""
    root = write_images(tmp_path_factory.mktemp("ref") / "ds", N_IMAGES, seed=1)
    profile = validate_dataset(root, CONFIG).profile
    assert set(profile["image_statistics"]) >= {"red_mean", "green_mean", "blue_saturated"}
    return {**profile, "source": "synthetic reference"}


def test_a_15_percent_green_shift_is_caught_and_new_images_alone_are_not(
        image_reference: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = ValidationConfig(image_size=SIZE)
    same = validate_dataset(write_images(tmp_path / "same", N_IMAGES, seed=2), config, image_reference)
    assert not [f for f in same.failures if f["expectation"] == "expect_image_statistic_within_reference_bounds"]

    shifted = write_images(tmp_path / "shifted", N_IMAGES, seed=2, green_gain=1.15)
    report = validate_dataset(shifted, config, image_reference)
    moved = {f["column"]: f for f in report.failures
             if f["expectation"] == "expect_image_statistic_within_reference_bounds"}
    assert "green_mean" in moved and not {"red_mean", "blue_mean"} & set(moved), report.summary_lines()
    example = moved["green_mean"]["examples"][0]
    assert example["observed"] > example["upper"] and example["p_adjusted"] < 0.05

    cls = custom_expectations()["expect_image_statistic_within_reference_bounds"]
    monkeypatch.setattr(cls, "_validate", always_passes)
    broken = validate_dataset(shifted, config, image_reference)
    assert not [f for f in broken.failures if f["expectation"] == "expect_image_statistic_within_reference_bounds"]


def test_rows_added_since_the_reference_are_compared_on_their_own(tmp_path: Path) -> None:
    """Old data plus new rows in which Centrosome vanished: the whole set (diluted) is within
    bounds, the new rows are not."""
    template = tmp_path / "t.png"
    write_png(template, SIZE)
    rows = [(line.split(",")[0], parse_label_set(line.split(",")[1]))
            for line in (REAL / "train.csv").read_text().splitlines()[1:]]
    old, pool = rows[:3000], rows[3000:]
    new = [r for r in pool if CENTROSOME not in r[1]][:400]
    reference = {**validate_dataset(write_rows(tmp_path / "old", old, template), CONFIG).profile, "source": "old"}
    config = ValidationConfig(image_size=SIZE, max_image_bytes=200_000)
    report = validate_dataset(write_rows(tmp_path / "grown", old + new, template), config, reference)
    windows = {f.get("window"): f for f in report.failures}
    assert set(windows) == {"rows added since the reference"}, report.summary_lines()
    finding = windows["rows added since the reference"]
    assert finding["rows"] == 400 and [e["class"] for e in finding["examples"]] == [CENTROSOME]
    shutil.rmtree(tmp_path / "grown")
