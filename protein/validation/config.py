"""What validation checks and how strictly: one frozen config, plus the constants the suites share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SUITES = ("labels", "files", "images", "integrity", "distribution")
MAX_EXAMPLES = 20
SUMMARY_EXAMPLES = 5
# A competition PNG is 0.1-1 MB; anything this large is not one, and reading it whole into
# memory (a zip bomb member, a mislabelled video) could take the worker down.
DEFAULT_MAX_IMAGE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class ValidationConfig:
    """Drift is a two-proportion test per class share and labels-per-image bucket (Holm-corrected
    at `drift_alpha`), flagged only when the change is also at least `drift_min_relative_change`
    of the reference share: significant and large enough to matter."""

    image_size: int = 512
    min_rows: int = 1
    max_rows: int = 1_000_000
    check_pixels: bool = True
    drift_alpha: float = 0.05
    drift_min_relative_change: float = 0.25
    drift_action: Literal["fail", "warn"] = "fail"
    min_rows_for_drift: int = 200
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 <= self.min_rows <= self.max_rows:
            raise ValueError(f"need 0 <= min_rows <= max_rows, got {self.min_rows}, {self.max_rows}")
        if not 0 < self.drift_alpha < 1:
            raise ValueError(f"drift_alpha is a significance level between 0 and 1, got {self.drift_alpha}")
        if self.drift_min_relative_change < 0:
            raise ValueError(f"drift_min_relative_change must be >= 0, got {self.drift_min_relative_change}")
        if self.drift_action not in ("fail", "warn"):
            raise ValueError(f"drift_action must be 'fail' or 'warn', got {self.drift_action!r}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be positive, got {self.max_image_bytes}")
