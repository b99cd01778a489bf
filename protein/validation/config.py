"""What validation checks and how strictly: one frozen config, plus the constants the suites share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

SUITES = ("labels", "files", "images", "integrity", "distribution")
# What --headers-only (check_pixels=False) does not check: each needs the decoded pixels.
PIXEL_CHECKS = ("pixel decode (expect_png_to_decode reads header and IEND trailer only)",
                "content leakage between train and test (expect_no_content_overlap_between_splits)",
                "duplicate train images", "blank images",
                "label drift of the rows added since the reference (rows are identified by pixel content)",
                "image statistics drift (expect_image_statistic_within_reference_bounds)",
                "near-duplicate images (expect_no_near_duplicate_images)")
MAX_EXAMPLES = 20
SUMMARY_EXAMPLES = 5
# A competition PNG is 0.1-1 MB; anything this large is not one, and reading it whole into
# memory (a zip bomb member, a mislabelled video) could take the worker down.
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024
# Larger than any image this pipeline decodes; a bound beyond it only postpones the refusal to the read.
MAX_IMAGE_BYTES_BOUND = 1024 * 1024 * 1024
# Hamming distance (of 64 bits) within which two difference hashes make a near-duplicate pair.
# Re-encoded (JPEG quality 90), brightness-scaled (+15 %) or resized (512 -> 384 -> 512 px) copies
# of synthetic images moved 0-5 bits; unrelated images differed in 13 or more (docs/validation.md).
DEFAULT_NEAR_DUPLICATE_DISTANCE = 6
# The search probes C(16, d // 4) values per 16-bit band: up to 11 bits that is at most 137.
MAX_NEAR_DUPLICATE_DISTANCE = 11


@dataclass(frozen=True)
class ValidationConfig:
    """Drift is a two-proportion test per class share and labels-per-image bucket (Holm-corrected
    at `drift_alpha`), flagged only when the change is also large enough to matter: at least
    `drift_min_relative_change` of the reference share or `drift_min_absolute_change` share
    points, whichever is smaller (relative for rare classes, absolute for common ones). Image
    statistics drift when significant (Bonferroni at `drift_alpha`) and moved by at least
    `image_drift_min_relative_change` of the reference mean. Two images are near duplicates when
    their difference hashes are at most `near_duplicate_max_distance` bits apart (a warning)."""

    image_size: int = 512
    min_rows: int = 1
    max_rows: int = 1_000_000
    check_pixels: bool = True
    drift_alpha: float = 0.05
    drift_min_relative_change: float = 0.25
    drift_min_absolute_change: float = 0.05
    image_drift_min_relative_change: float = 0.10
    drift_action: Literal["fail", "warn"] = "fail"
    min_rows_for_drift: int = 200
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    near_duplicate_max_distance: int = DEFAULT_NEAR_DUPLICATE_DISTANCE

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 <= self.min_rows <= self.max_rows:
            raise ValueError(f"need 0 <= min_rows <= max_rows, got {self.min_rows}, {self.max_rows}")
        if not 0 < self.drift_alpha < 1:
            raise ValueError(f"drift_alpha is a significance level between 0 and 1, got {self.drift_alpha}")
        # Written so that NaN fails them too (NaN < 0 is false, and GX then refused it in three lines).
        if not 0 <= self.drift_min_relative_change < math.inf:
            raise ValueError(f"drift_min_relative_change must be a finite number >= 0, got "
                             f"{self.drift_min_relative_change}")
        if not 0 < self.drift_min_absolute_change <= 1:
            raise ValueError(f"drift_min_absolute_change is a share in (0, 1], got {self.drift_min_absolute_change}")
        if not 0 <= self.image_drift_min_relative_change < math.inf:
            raise ValueError(f"image_drift_min_relative_change must be a finite number >= 0, got "
                             f"{self.image_drift_min_relative_change}")
        if self.drift_action not in ("fail", "warn"):
            raise ValueError(f"drift_action must be 'fail' or 'warn', got {self.drift_action!r}")
        if not 1 <= self.max_image_bytes <= MAX_IMAGE_BYTES_BOUND:
            raise ValueError(f"max_image_bytes must be 1 to {MAX_IMAGE_BYTES_BOUND:,} (1 GiB), "
                             f"got {self.max_image_bytes}")
        if not 0 <= self.near_duplicate_max_distance <= MAX_NEAR_DUPLICATE_DISTANCE:
            raise ValueError(f"near_duplicate_max_distance is 0 to {MAX_NEAR_DUPLICATE_DISTANCE} bits, got "
                             f"{self.near_duplicate_max_distance}")
