"""Typed, frozen configuration: one object per concern, built once at the entry point.

Every config round-trips through plain dicts so it can be saved beside each checkpoint,
model version and prediction, and rebuilt from them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

DEFAULT_IMAGE_SIZE = 128
COMPETITION_IMAGE_SIZE = 512
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "efficientnet_b0")

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config, ignoring keys a newer version may have added."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what a training run produces."""

    arch: str = "resnet18"
    image_size: int = DEFAULT_IMAGE_SIZE
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = 2.0
    holdout_fraction: float = 0.2
    seed: int = 0
    # Optional local file with backbone weights (safetensors or a plain state dict);
    # None trains from scratch. Never downloaded at run time.
    weights: str | None = None
    device: str = "auto"
    compile: bool = False
    channels_last: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be 16-1024 px, got {self.image_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.loss not in ("bce", "focal"):
            raise ValueError(f"loss must be 'bce' or 'focal', got {self.loss!r}")


@dataclass(frozen=True)
class GateConfig:
    """When a challenger may replace the champion (scores are holdout F-scores, 0-1)."""

    min_score: float = 0.3
    # A retrain on unchanged data reproduces the champion; demand a real improvement.
    min_gain: float = 0.005
    max_class_drop: float = 0.1
    metric: str = "f1_samples"
    # Against a champion, fewer rows than this that neither model trained on is noise, not evidence.
    min_rows: int = 50
    # Paired bootstrap of the gain: promote only when the lower end of this interval clears min_gain.
    resamples: int = 1000
    confidence: float = 0.95
    bootstrap_seed: int = 0

    def __post_init__(self) -> None:
        if self.min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {self.min_rows}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be >= 100, got {self.resamples}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1), got {self.confidence}")


@dataclass(frozen=True)
class SynthConfig:
    train: int = 200
    test: int = 50
    size: int = COMPETITION_IMAGE_SIZE
    seed: int = 0
    label_noise: float = 0.0
    workers: int = 1
