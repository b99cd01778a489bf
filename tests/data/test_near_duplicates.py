"""Near-duplicate images: the banded search finds exactly the pairs a full comparison finds; a
re-encoded, brightness-shifted or resized copy of a synthetic image is found (a warning naming both
files), unrelated images are not, and GX's Expectation decides it (break `_validate`: no warning)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from protein.synth.render import render_image
from protein.validation import ValidationConfig, validate_dataset
from protein.validation.config import DEFAULT_NEAR_DUPLICATE_DISTANCE
from protein.validation.expectations import custom_expectations
from protein.validation.neardup import difference_hash, hashes_from_hex, near_pairs

SIZE = 128
CONFIG = ValidationConfig(image_size=SIZE)
TRAIN = {"101": "0", "102": "6 4", "103": "2", "104": "1 3", "105": "9 5 0", "106": "7"}
TEST = ["201", "202", "203"]


def synthetic(seed: int, labels: frozenset[int] = frozenset({0})) -> Image.Image:
    return Image.fromarray(render_image(labels, SIZE, np.random.default_rng(seed)), "RGB")


def brighter(image: Image.Image) -> Image.Image:
    return Image.fromarray((np.asarray(image, dtype=np.float64) * 1.15).clip(0, 255).astype(np.uint8), "RGB")


def reencoded(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def resized(image: Image.Image) -> Image.Image:
    return image.resize((SIZE * 3 // 4, SIZE * 3 // 4)).resize((SIZE, SIZE))


def distance(a: Image.Image, b: Image.Image) -> int:
    return (int(difference_hash(a), 16) ^ int(difference_hash(b), 16)).bit_count()


def write_dataset(root: Path, images: dict[str, Image.Image]) -> Path:
    """train.csv / sample_submission.csv over TRAIN and TEST, each image from `images` by
    "train/<id>" or "test/<id>"."""
    root.mkdir(parents=True)
    (root / "train.csv").write_text("Image,Label\n" + "".join(f"{k},{v}\n" for k, v in TRAIN.items()))
    (root / "sample_submission.csv").write_text("Image,Label\n" + "".join(f"{t},0\n" for t in TEST))
    for name, image in images.items():
        (root / name).parent.mkdir(exist_ok=True)
        image.save(root / f"{name}.png")
    return root


def base_images() -> dict[str, Image.Image]:
    images = {f"train/{k}": synthetic(i, frozenset({i % 10})) for i, k in enumerate(TRAIN)}
    images |= {f"test/{k}": synthetic(100 + i) for i, k in enumerate(TEST)}
    return images


def near_warnings(report: Any) -> dict[str, dict]:
    return {w["between"]: w for w in report.warnings if w["expectation"] == "expect_no_near_duplicate_images"}


def always_passes(self: Any, metrics: dict, runtime_configuration: dict | None = None,
                  execution_engine: Any = None) -> dict:
    return {"success": True, "result": {"observed_value": "broken on purpose"}}


@pytest.mark.parametrize("max_distance", [0, 3, 6, 7, 11])
def test_banded_search_finds_what_a_full_comparison_finds(max_distance: int) -> None:
    rng = np.random.default_rng(max_distance)
    hashes = rng.integers(0, 2**63, 800, dtype=np.int64).astype(np.uint64) << np.uint64(1)
    for a, b in rng.integers(0, 800, (150, 2)):  # planted copies 0-12 bits apart
        flips = rng.choice(64, rng.integers(0, 13), replace=False)
        hashes[b] = hashes[a] ^ np.uint64(sum(1 << int(f) for f in flips))
    hashes[10:60] = hashes[10]  # a clump of identical hashes
    found = [(int(i), int(j), int(d))
             for chunk in near_pairs(hashes, max_distance) for i, j, d in zip(*chunk, strict=True)]
    everything = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    expected = {(i, j, int(everything[i, j])) for i, j in zip(*np.triu_indices(len(hashes), 1), strict=True)
                if everything[i, j] <= max_distance}
    assert len(found) == len(set(found))  # each pair once, though several bands find it
    assert set(found) == expected


def test_near_copies_are_close_and_unrelated_images_are_not() -> None:
    originals = [synthetic(seed, frozenset({seed % 10})) for seed in range(12)]
    for original in originals:
        for copy in (brighter(original), reencoded(original), resized(original)):
            assert distance(original, copy) <= DEFAULT_NEAR_DUPLICATE_DISTANCE
    unrelated = [distance(a, b) for k, a in enumerate(originals) for b in originals[k + 1:]]
    assert min(unrelated) > DEFAULT_NEAR_DUPLICATE_DISTANCE
    assert hashes_from_hex([difference_hash(originals[0])])[0] == int(difference_hash(originals[0]), 16)


def test_validation_names_near_copies_as_warnings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = base_images()
    images["test/202"] = reencoded(images["train/103"])  # leaks, though no pixel is the same
    images["train/106"] = brighter(images["train/102"])
    dataset = write_dataset(tmp_path / "ds", images)
    report = validate_dataset(dataset, CONFIG)
    assert report.success and not report.failures  # near copies warn; exact ones fail (corpus tests)
    found = near_warnings(report)
    (cross,) = found["train and test"]["examples"]
    assert (cross["file"], cross["value"]) == ("test/202.png", "train/103.png")
    (within,) = found["within train"]["examples"]
    assert (within["file"], within["value"]) == ("train/106.png", "train/102.png")
    assert within["distance"] <= DEFAULT_NEAR_DUPLICATE_DISTANCE
    lines = report.warning_lines()  # what the CLI prints
    assert any("test/202.png ~ train/103.png (" in line for line in lines)
    assert any("train/106.png ~ train/102.png (" in line for line in lines)

    monkeypatch.setattr(custom_expectations()["expect_no_near_duplicate_images"], "_validate", always_passes)
    assert near_warnings(validate_dataset(dataset, CONFIG)) == {}


def test_unrelated_and_identical_images_are_not_near_duplicates(tmp_path: Path) -> None:
    images = base_images()
    images["train/106"] = images["train/102"]  # same pixels: the exact-duplicate check's, not this one's
    images["test/203"] = Image.new("RGB", (SIZE, SIZE), (7, 7, 7))  # blank: every blank hash is the same
    images["train/105"] = Image.new("RGB", (SIZE, SIZE), (9, 9, 9))
    report = validate_dataset(write_dataset(tmp_path / "ds", images), CONFIG)
    assert near_warnings(report) == {}
    assert {w["message"] for w in report.warnings} >= {
        "train images should not repeat another train image's content",
        "images should not be blank (every pixel the same value)"}


def test_headers_only_says_near_duplicates_were_not_checked(tmp_path: Path) -> None:
    images = base_images()
    images["train/106"] = brighter(images["train/102"])
    dataset = write_dataset(tmp_path / "ds", images)
    report = validate_dataset(dataset, ValidationConfig(image_size=SIZE, check_pixels=False))
    assert near_warnings(report) == {}
    assert "near-duplicate images (expect_no_near_duplicate_images)" in report.skipped
    shutil.rmtree(dataset)
