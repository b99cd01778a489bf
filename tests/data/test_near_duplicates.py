"""Near-duplicate images: the banded search finds exactly the pairs a full comparison finds; a
re-encoded, brightness-shifted or resized copy of a synthetic image is found (a warning naming both
files), unrelated images are not, and GX's Expectation decides it (break `_validate`: no warning)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from protein.synth.render import render_image
from protein.validation import ValidationConfig, validate_dataset
from protein.validation.config import DEFAULT_NEAR_DUPLICATE_DISTANCE
from protein.validation.expectations import custom_expectations
from protein.validation.neardup import SCOPES, difference_hash, hashes_from_hex, near_duplicates, near_pairs

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


def copies_frame(seed: int) -> pd.DataFrame:
    """Rows of a validation's image table: 30 images (some a few bits from another), each in 1-4
    copies with the same pixels spread over train and test, a few not decoded or blank."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**62, 30, dtype=np.int64)
    for a, b in rng.integers(0, 30, (12, 2)):
        hashes[b] = hashes[a] ^ int(sum(1 << int(f) for f in rng.choice(62, rng.integers(0, 9), replace=False)))
    rows = []
    for image, value in enumerate(hashes):
        for copy in range(int(rng.integers(1, 5))):
            rows.append({"split": str(rng.choice(["train", "test", "test", "train", "sample"])),
                         "file": f"{image}-{copy}.png", "dhash": f"{int(value):016x}",
                         "content_sha256": f"pixels of {image}", "constant": bool(rng.random() < 0.05)})
    rows[3]["dhash"] = None  # not decoded
    rows[5]["content_sha256"] = None  # no content hash: unlike any other row
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


def pairs_image_by_image(frame: pd.DataFrame, max_distance: int) -> dict[str, list[tuple[int, str, str]]]:
    """Every pair of usable rows with other pixels within max_distance, per scope: (distance, file, file)."""
    usable = frame[frame["dhash"].notna() & ~frame["constant"].astype(bool) & frame["split"].isin(["train", "test"])]
    rows = list(usable.itertuples())
    found: dict[str, list[tuple[int, str, str]]] = {scope: [] for scope in SCOPES}
    for k, one in enumerate(rows):
        for other in rows[k + 1:]:
            distance = (int(one.dhash, 16) ^ int(other.dhash, 16)).bit_count()
            same_pixels = one.content_sha256 is not None and one.content_sha256 == other.content_sha256
            if distance > max_distance or same_pixels or "test" == one.split == other.split:
                continue
            scope = SCOPES[0] if one.split != other.split else SCOPES[1]
            found[scope].append((distance, *sorted((one.file, other.file))))
    return found


@pytest.mark.parametrize("seed", range(8))
def test_copies_are_searched_once_and_counted_pair_by_pair(seed: int) -> None:
    frame = copies_frame(seed)
    expected = pairs_image_by_image(frame, DEFAULT_NEAR_DUPLICATE_DISTANCE)
    found = near_duplicates(frame, DEFAULT_NEAR_DUPLICATE_DISTANCE, examples=4)
    split = dict(zip(frame["file"], frame["split"], strict=True))
    for scope in SCOPES:
        assert found[scope]["count"] == len(expected[scope]), (seed, scope)
        examples = [(p["distance"], *sorted((p["file"], p["near"]))) for p in found[scope]["pairs"]]
        assert set(examples) <= set(expected[scope]), (seed, scope)  # real pairs of this scope, as found
        # The closest, one pair per two contents: as close as the closest pairs there are.
        closest = sorted({(d, a.split("-")[0], b.split("-")[0]) for d, a, b in expected[scope]})
        assert sorted(d for d, _, _ in examples) == [d for d, _, _ in closest[:4]], (seed, scope)
        if scope == SCOPES[0]:  # the test image named first: it is the one that leaks
            assert all(split[p["file"]] == "test" for p in found[scope]["pairs"]), (seed, found[scope])


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
    assert any("'test/202.png' ~ 'train/103.png' (" in line for line in lines)
    assert any("'train/106.png' ~ 'train/102.png' (" in line for line in lines)

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
