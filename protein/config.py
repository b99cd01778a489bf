"""Typed, frozen configuration: one object per concern, built once at the entry point.

Every config round-trips through plain dicts so it can be saved beside each checkpoint,
model version and prediction, and rebuilt from them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from protein.modeling.arch_names import check_arch

DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")

DEFAULT_IMAGE_SIZE = 128
COMPETITION_IMAGE_SIZE = 512
# The architectures a form offers (the Prefect UI); the CLI and library accept every torchvision
# classification architecture (protein.modeling.arch_names).
ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d", "efficientnet_b0", "efficientnet_b1",
                 "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s", "convnext_tiny", "regnet_y_800mf",
                 "mobilenet_v3_large", "mobilenet_v3_small")
THRESHOLD_METRICS = ("f1_samples", "f1_micro", "f1_macro", "course_f_score")

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
    # The global batch: one optimizer step and one learning-rate step per batch_size images,
    # whatever the number of ranks (nproc) and accumulation steps it is split over.
    batch_size: int = 32
    # Gradient accumulation: each batch runs as this many micro-batches (for large images).
    accumulate: int = 1
    # The peak learning rate at lr_reference_batch; at another global batch it is scaled by
    # lr_scaling ('none', 'sqrt', 'linear'; protein.modeling.scaling.scaled_lr).
    lr: float = 2e-3
    lr_scaling: str = "none"
    lr_reference_batch: int = 32
    weight_decay: float = 1e-4
    loss: Literal["bce", "focal"] = "bce"
    focal_gamma: float = 2.0
    holdout_fraction: float = 0.2
    seed: int = 0
    # None trains from scratch; "imagenet" reads torchvision's ImageNet weights for arch from
    # $TORCH_HOME; anything else is a local safetensors/state-dict file. Never downloaded at run time.
    weights: str | None = None
    device: str = "auto"
    compile: bool = False
    channels_last: bool = True
    # Synchronise BatchNorm statistics over the ranks (SyncBatchNorm under DDP; no effect on one process).
    sync_bn: bool = False
    # Fewest images one rank may see per forward pass without sync_bn: fewer make BatchNorm's
    # batch statistics noise (check_batch_split refuses the split with what to change).
    min_batch_per_rank: int = 2
    # The named recipe this config started from (recorded; the fields below are what counts).
    recipe: str = "default"
    # Per-image brightness and contrast factors drawn from [1 - jitter, 1 + jitter] (0: off).
    jitter: float = 0.0
    # An exponential moving average of the weights, updated every step, is what is evaluated and
    # saved: the weight of a step halves after this many epochs (0: off, the last weights are used).
    # In epochs, so the average's memory does not change with the batch size or the number of GPUs.
    ema_half_life_epochs: float = 0.0
    # Test-time augmentation: average the probabilities of the 8 dihedral views.
    tta: bool = False
    # K-fold: hold out fold `fold` (1..folds) of an iterative stratification into `folds` parts
    # instead of a holdout_fraction share.
    fold: int | None = None
    folds: int = 5
    # Train on every row (no holdout); the thresholds are tuned on the out-of-fold probabilities
    # of the `thresholds_from` model versions (the K fold models of the same data).
    refit: bool = False
    thresholds_from: tuple[str, ...] = ()
    # Per-class thresholds tuned to maximise this metric (the gate's), never-empty rule applied.
    threshold_metric: str = "f1_samples"

    def __post_init__(self) -> None:
        check_arch(self.arch)
        # A config rebuilt from JSON carries a list; keep one type so equal configs compare equal.
        object.__setattr__(self, "thresholds_from", tuple(self.thresholds_from))
        if isinstance(self.weights, str) and self.weights.strip().lower() == "none":  # `--weights none`: from scratch
            object.__setattr__(self, "weights", None)
        if not 16 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be 16-1024 px, got {self.image_size}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.accumulate < 1 or self.batch_size % self.accumulate:
            raise ValueError(f"accumulate must be >= 1 and divide batch_size {self.batch_size}, got {self.accumulate}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        # NaN passes every `x < 0` check: each bound below is written so that NaN fails it. An lr of 0
        # trains a model that never learns; inf or NaN one whose weights are NaN.
        if not (0.0 < self.lr < 1e3):
            raise ValueError(f"lr must be a number in (0, 1000), got {self.lr}")
        if not (0.0 <= self.weight_decay < 1e3):
            raise ValueError(f"weight_decay must be a number in [0, 1000), got {self.weight_decay}")
        if not (0.0 <= self.focal_gamma <= 100.0):
            raise ValueError(f"focal_gamma must be a number in [0, 100], got {self.focal_gamma}")
        if not DEVICE_NAME.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N (N a GPU index), got {self.device!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be a whole number in [0, 2^32), got {self.seed}")
        if self.loss not in ("bce", "focal"):
            raise ValueError(f"loss must be 'bce' or 'focal', got {self.loss!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")
        if not 0.0 <= self.ema_half_life_epochs <= 100.0:
            raise ValueError(f"ema_half_life_epochs must be in [0, 100] (0 = no EMA), got {self.ema_half_life_epochs}")
        from protein.modeling.scaling import LR_SCALING_RULES

        if self.lr_scaling not in LR_SCALING_RULES:
            raise ValueError(f"lr_scaling must be one of {', '.join(LR_SCALING_RULES)}, got {self.lr_scaling!r}")
        if self.lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1, got {self.lr_reference_batch}")
        if self.min_batch_per_rank < 1:
            raise ValueError(f"min_batch_per_rank must be >= 1, got {self.min_batch_per_rank}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.fold is not None and not 1 <= self.fold <= self.folds:
            raise ValueError(f"fold must be 1..{self.folds}, got {self.fold}")
        if self.refit and self.fold is not None:
            raise ValueError("refit trains on every row; it cannot also hold out a fold")
        if self.refit != bool(self.thresholds_from):
            raise ValueError("refit needs thresholds_from (the fold models whose out-of-fold probabilities tune "
                             "its thresholds), and thresholds_from is only used by refit")
        if self.threshold_metric not in THRESHOLD_METRICS:
            raise ValueError(f"threshold_metric must be one of {', '.join(THRESHOLD_METRICS)}, "
                             f"got {self.threshold_metric!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")


# Named starting points; explicit options override any field. "winner" follows the recipe that
# won the competition: EfficientNet-B1 (B2 selectable with arch) at full resolution from ImageNet
# weights, AdamW + one-cycle, dihedral and brightness/contrast augmentation, an EMA of the
# weights, per-class thresholds and 8-view test-time augmentation. Its EMA half-life of 1.5 epochs
# is the original per-step decay 0.999 at batch 32 on the competition's ~15,400 training rows
# (693 steps); its learning rate is tuned at batch 32 and scales with the square root of the
# global batch (AdamW); 8 images per GPU is its floor (docs/recipes.md).
RECIPES: dict[str, dict[str, Any]] = {
    "default": {},
    "winner": {"arch": "efficientnet_b1", "image_size": COMPETITION_IMAGE_SIZE, "weights": "imagenet",
               "epochs": 26, "batch_size": 32, "lr": 1e-3, "lr_scaling": "sqrt", "lr_reference_batch": 32,
               "weight_decay": 1e-2, "jitter": 0.2, "ema_half_life_epochs": 1.5, "min_batch_per_rank": 8,
               "tta": True},
}


def recipe_config(recipe: str = "default", **overrides: Any) -> TrainConfig:
    """The recipe's TrainConfig with every override that is not None (or empty text) applied on top."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r} (expected one of {', '.join(RECIPES)})")
    # An empty text is no value, as in the UI's form ("empty: the recipe's"): `--weights ""` trained
    # the winner recipe from scratch instead of from its ImageNet weights ('none' says that).
    given = {k: v for k, v in overrides.items() if v is not None and not (isinstance(v, str) and not v.strip())}
    values = {**RECIPES[recipe], **given, "recipe": recipe}
    return TrainConfig(**values)


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
        if self.metric not in THRESHOLD_METRICS:  # each model's thresholds are tuned for it
            raise ValueError(f"metric must be one of {', '.join(THRESHOLD_METRICS)}, got {self.metric!r}")
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
