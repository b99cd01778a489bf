"""Seconds to validate the real labels table and the metadata of a real-sized image set.

Dataset: the real train.csv (19,236 rows) with one valid 512x512 RGB PNG hard-linked under every
real id (the real test image 10034.png when shared/ has it, so decode cost is that of a real
image). Hard links make 19,236 "files" in well under a second and no disk space; every file is
still opened and read separately, but the page cache holds the one inode, so these figures are
CPU cost and leave out cold-disk reads of ~10 GB of real images.

Rows:
- labels only: train.csv with no image folder (labels, files and distribution suites; all images
  are "missing", which is quick).
- headers: all 19,236 images, header + trailer read only (check_pixels=False).
- full decode: a subset of images fully decoded (check_pixels=True), per-image cost extrapolated to
  19,236 images - extrapolated, not measured, to keep the benchmark under two minutes.

- content hashing: the extra cost of what the full pass adds per image for leakage, duplicate,
  near-duplicate and blank-image checks and image statistics (SHA-256 of the decoded pixels, the
  768-bin histogram's statistics, the 64-bit difference hash), measured side by side with
  the decode alone on the same image, then extrapolated to the real set size (19,236 train + 8,243
  test images) - extrapolated, not measured on 27,479 files.

Each row is the median of `--repeats` calls after one warm-up call, which pays the one-off
Great Expectations import (reported separately).

    python -m bench.validation_bench [--decode-subset 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.common import format_table, median, results_path, write_json
from protein.validation import ValidationConfig, ValidationReport, validate_dataset

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
REAL_ROWS = 19_236
REAL_TEST_ROWS = 8_243
IMAGE_SIZE = 512


def make_dataset(root: Path, n_rows: int | None, with_images: bool) -> Path:
    """train.csv (first n_rows of the real one, or all) and, optionally, one PNG linked per id."""
    root.mkdir(parents=True)
    lines = (REAL / "train.csv").read_text().splitlines()
    lines = lines[: n_rows + 1] if n_rows else lines
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    if not with_images:
        return root
    template = root.parent / "template.png"
    if not template.exists():
        real_image = REAL / "test" / "10034.png"
        if real_image.exists():
            shutil.copyfile(real_image, template)
        else:  # dark low-amplitude noise compresses roughly like the microscopy images
            pixels = (np.random.default_rng(0).random((IMAGE_SIZE, IMAGE_SIZE, 3)) * 48).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(template)
    train = root / "train"
    train.mkdir()
    for line in lines[1:]:
        os.link(template, train / f"{line.split(',', 1)[0]}.png")
    return root


def timed(path: Path, config: ValidationConfig, repeats: int) -> tuple[float, ValidationReport]:
    samples, report = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        report = validate_dataset(path, config)
        samples.append(time.perf_counter() - started)
    assert report is not None
    return median(samples), report


def content_hash_cost(template: Path, n: int, repeats: int) -> dict[str, float]:
    """ms per image of what the pass adds after the decode it already does (SHA-256 of the decoded
    pixels, band statistics, difference hash), timed on its own, next to the decode it follows (interleaved, so
    load changes hit both alike)."""
    import hashlib

    from protein.data import decode_png
    from protein.validation.images import band_statistics
    from protein.validation.neardup import difference_hash

    data = template.read_bytes()
    image = decode_png(data, "bench")

    def decode_only() -> None:
        decode_png(data, "bench")

    def hash_and_blank_check() -> None:
        hashlib.sha256(f"{image.mode}{image.size}".encode() + image.tobytes()).hexdigest()
        band_statistics(image.histogram(), image.size[0] * image.size[1])  # blank check + intensity statistics
        difference_hash(image)  # near-duplicates

    decode, hashing = [], []
    for _ in range(repeats):
        for fn, out in ((decode_only, decode), (hash_and_blank_check, hashing)):
            started = time.perf_counter()
            for _ in range(n):
                fn()
            out.append(1000 * (time.perf_counter() - started) / n)
    decode_ms, hash_ms = median(decode), median(hashing)
    return {"decode_ms": decode_ms, "hash_ms": hash_ms, "ratio": (decode_ms + hash_ms) / decode_ms}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run, print the table, write bench/results/validation.json; returns the headline numbers
    (flat, for bench.run_all's summary)."""
    parser = argparse.ArgumentParser(prog="python -m bench.validation_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--decode-subset", type=int, default=2000, help="images fully decoded (extrapolated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hash-images", type=int, default=200, help="decodes per side of the hashing comparison")
    parser.add_argument("--quick", action="store_true",
                        help="300 decoded images, 1 repeat, 50 hashing decodes: a side-by-side smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.decode_subset, args.repeats, args.hash_images = 300, 1, 50

    headers = ValidationConfig(image_size=IMAGE_SIZE, check_pixels=False)
    decode = ValidationConfig(image_size=IMAGE_SIZE, check_pixels=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="protein-validation-bench-") as tmp:
        started = time.perf_counter()
        labels_only = make_dataset(Path(tmp) / "labels-only", None, with_images=False)
        full = make_dataset(Path(tmp) / "full", None, with_images=True)
        subset = make_dataset(Path(tmp) / "subset", args.decode_subset, with_images=True)
        setup_s = time.perf_counter() - started

        started = time.perf_counter()
        validate_dataset(labels_only, headers)  # pays the GX import once
        first_call_s = time.perf_counter() - started

        seconds, report = timed(labels_only, headers, args.repeats)
        rows.append({"case": "labels only (real train.csv)", "rows": REAL_ROWS, "images": 0, "seconds": seconds,
                     "ms_per_image": None, "gx_s": report.statistics["timings_s"]["great_expectations"],
                     "labels_suite_failures": sum(f["suite"] == "labels" for f in report.failures)})

        seconds, report = timed(full, headers, args.repeats)
        images = report.statistics["images_checked"]
        rows.append({"case": "labels + image headers", "rows": REAL_ROWS, "images": images, "seconds": seconds,
                     "ms_per_image": 1000 * report.statistics["timings_s"]["images"] / images,
                     "gx_s": report.statistics["timings_s"]["great_expectations"],
                     "success": report.success, "workers": report.statistics["image_workers"]})

        seconds, report = timed(subset, decode, args.repeats)
        images = report.statistics["images_checked"]
        per_image_s = report.statistics["timings_s"]["images"] / images
        header_row = rows[1]
        extrapolated = header_row["seconds"] + REAL_ROWS * per_image_s - REAL_ROWS * header_row["ms_per_image"] / 1000
        rows.append({"case": f"full decode, {images} images measured", "rows": args.decode_subset, "images": images,
                     "seconds": seconds, "ms_per_image": 1000 * per_image_s,
                     "gx_s": report.statistics["timings_s"]["great_expectations"], "success": report.success,
                     "workers": report.statistics["image_workers"]})
        rows.append({"case": "full decode, extrapolated to 19,236 images", "rows": REAL_ROWS, "images": REAL_ROWS,
                     "seconds": extrapolated, "ms_per_image": 1000 * per_image_s, "extrapolated": True,
                     "workers": report.statistics["image_workers"]})
        image_bytes = (Path(tmp) / "template.png").stat().st_size
        hashing = content_hash_cost(Path(tmp) / "template.png", args.hash_images, args.repeats)
        total = REAL_ROWS + REAL_TEST_ROWS
        rows.append({"case": f"content hash + statistics + dHash, extrapolated to {total:,} images (1 process)",
                     "rows": REAL_ROWS, "images": total, "seconds": total * hashing["hash_ms"] / 1000,
                     "ms_per_image": hashing["hash_ms"], "extrapolated": True, "workers": 1,
                     "decode_ms_per_image": hashing["decode_ms"], "ratio_vs_decode_alone": hashing["ratio"]})

    columns = ["case", "rows", "images", "seconds", "ms_per_image", "gx_s", "workers"]
    print(format_table(rows, columns))
    print(f"first call (imports Great Expectations): {first_call_s:.1f} s; dataset setup: {setup_s:.1f} s; "
          f"image file {image_bytes:,} bytes")
    payload = {
        "benchmark": "validation",
        "description": __doc__.split("\n\n")[0],
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "load_average_1m": os.getloadavg()[0]},
        "image_bytes": image_bytes,
        "first_call_s": first_call_s,
        "setup_s": setup_s,
        "repeats": args.repeats,
        "rows": rows,
        "notes": ("Images are hard links of one file (page-cache warm): CPU cost only. The full-decode row for "
                  "19,236 images is extrapolated from the measured subset."),
    }
    path = write_json(results_path("validation", args.quick), payload)
    print(f"wrote {path}")
    return {
        "labels_only_s": rows[0]["seconds"],
        "labels_and_19236_headers_s": rows[1]["seconds"],
        "full_decode_ms_per_image": rows[2]["ms_per_image"],
        "full_decode_19236_extrapolated_s": rows[3]["seconds"],
        "first_call_with_gx_import_s": first_call_s,
        "content_hash_ms_per_image": rows[4]["ms_per_image"],
        "content_hash_27479_extrapolated_s": rows[4]["seconds"],
    }


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
