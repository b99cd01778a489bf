"""Flow parameters as pydantic models: titles, descriptions and defaults make the Prefect UI
run form usable without reading code. Each converts to the library's frozen config."""

from __future__ import annotations

import json
import logging
import sys
from typing import Literal

from prefect.states import Failed, State
from pydantic import BaseModel, Field

from protein.config import DEFAULT_IMAGE_SIZE, GateConfig, TrainConfig, recipe_config
from protein.errors import ProteinError
from protein.validation import ValidationConfig
from tasks.dispatch import DispatchConfig
from tasks.liveness import LOWEST_LOST_AFTER_S


class FlowProblem(Exception):
    """Why a flow failed without an exception of its own (a task's problem dict), with the exit code
    the CLI gives that cause; `report_state` exits with it."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message, exit_code)  # both in args: a persisted result unpickles whole
        self.exit_code = exit_code

    def __str__(self) -> str:
        return str(self.args[0])


def failed(message: str, exit_code: int) -> State:
    """A Failed state whose result carries ``exit_code``: a bare Failed(message) ended the command line in 1."""
    return Failed(message=message, data=FlowProblem(message, exit_code))


def report_state(state: State, flow_name: str) -> int:
    """A finished run's result as JSON on stdout (exit 0), or its failure as one line on stderr with
    the protein CLI's exit code for the error that failed it (1 when the flow itself failed it)."""
    if not state.is_completed():
        print(f"{flow_name} failed: {state.message}", file=sys.stderr)
        try:
            error = state.result(raise_on_failure=False)
        except Exception as exc:  # the state's result may itself be the unreadable part
            error = exc
        code = getattr(error, "exit_code", 1) if isinstance(error, Exception) else 1
        return code if isinstance(code, int) and code > 0 else 1
    print(json.dumps(state.result(), default=str))
    return 0


def route_library_logs() -> None:
    """Called at the start of a flow: when the job environment lists 'protein' in
    PREFECT_LOGGING_EXTRA_LOGGERS (the deployments do), Prefect attaches its API handler to that
    logger but leaves its level NOTSET, i.e. the root's WARNING; INFO (epochs, resume, cache
    hits) would never reach the UI."""
    from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS

    library = logging.getLogger("protein")
    if "protein" in (PREFECT_LOGGING_EXTRA_LOGGERS.value() or []) and library.level == logging.NOTSET:
        library.setLevel(logging.INFO)


Architecture = Literal["resnet18", "resnet34", "resnet50", "resnext50_32x4d", "efficientnet_b0", "efficientnet_b1",
                       "efficientnet_b2", "efficientnet_b3", "efficientnet_v2_s", "convnext_tiny", "regnet_y_800mf",
                       "mobilenet_v3_large", "mobilenet_v3_small"]


class TrainParams(BaseModel):
    """How to train the challenger. Empty fields take the recipe's value."""

    recipe: Literal["default", "winner"] = Field(
        "default", title="Recipe", description="winner: efficientnet_b1 at 512 px from ImageNet weights, 26 epochs, "
        "EMA of the weights, brightness/contrast jitter, 8-view test-time augmentation")
    arch: Architecture | None = Field(
        None, title="Architecture", description="torchvision backbone with a 10-logit head (default resnet18; "
        "winner efficientnet_b1, efficientnet_b2 selectable). The CLI accepts any torchvision classification model")
    epochs: int | None = Field(None, ge=1, le=200, title="Epochs", description="default 4; winner 26")
    image_size: int | None = Field(None, ge=16, le=1024, title="Image size (px)",
                                   description=f"default {DEFAULT_IMAGE_SIZE}, winner 512; images are decoded and "
                                               "resized once, then cached")
    batch_size: int | None = Field(None, ge=1, le=1024, title="Batch size",
                                   description="the global batch, over all processes (default 32)")
    accumulate: int | None = Field(None, ge=1, le=64, title="Gradient accumulation steps",
                                   description="each batch runs as this many micro-batches (default 1)")
    lr: float | None = Field(None, gt=0, title="Peak learning rate",
                             description="AdamW with a one-cycle schedule (default 0.002; winner 0.001)")
    loss: Literal["bce", "focal"] | None = Field(None, title="Loss", description="default bce")
    holdout_fraction: float | None = Field(None, gt=0, lt=1, title="Holdout share",
                                           description="stratified holdout for thresholds and the gate (default 0.2)")
    seed: int | None = Field(None, ge=0, lt=2**32, title="Seed",
                             description="split, initialisation and augmentation seed (default 0)")
    weights: str | None = Field(None, title="Pretrained weights",
                                description="'imagenet' (torchvision's file in the worker's $TORCH_HOME, never "
                                            "downloaded) or a local safetensors/state-dict file; empty: the recipe's "
                                            "(default from scratch; winner imagenet)")
    device: str | None = Field(None, title="Device", description="auto (default) picks CUDA when the worker has a GPU")
    share_cache: bool = Field(False, title="Share the decoded-image cache through the store",
                              description="pull it when another worker built it, push it otherwise")
    nproc: int = Field(1, ge=1, le=64, title="Processes (GPUs) on the worker",
                       description="more than 1: data-parallel training under torchrun, one process per GPU "
                                   "(docs/distributed.md)")

    def to_config(self) -> TrainConfig:
        return recipe_config(**self.model_dump(exclude={"share_cache", "nproc"}))

    def checked_config(self) -> TrainConfig:
        """to_config, with the global batch checked to split over nproc ranks (ValueError naming
        what to change): a retrain fails on it at its start, not after validation and dispatch."""
        from protein.modeling.scaling import check_batch_split

        config = self.to_config()
        check_batch_split(config, self.nproc)
        return config

    def refusal(self) -> State | None:
        """The Failed state a flow returns first when these settings cannot train (checked_config's
        refusal, with the CLI's usage exit code), before any data is read; None when they can."""
        try:
            self.checked_config()
        except ValueError as exc:
            return failed(f"train settings: {exc}; nothing was run", ProteinError.exit_code)
        return None


class DispatchParams(BaseModel):
    """How retrain waits for training on the gpu pool (only with a train deployment)."""

    timeout_minutes: float = Field(360, gt=0, title="Timeout per attempt (min)",
                                   description="a training attempt not final by then is cancelled and dispatched again")
    attempts: int = Field(3, ge=1, le=10, title="Attempts",
                          description="crashed or timed-out training is dispatched again, resuming from its checkpoint")
    poll_seconds: float = Field(5, gt=0, title="Poll interval (s)")
    lost_after_seconds: float = Field(
        120, ge=LOWEST_LOST_AFTER_S, title="Lost after (s)",
        description="a run whose pulses (sent four times in this span), or whose worker's heartbeats before the "
                    "first, stay silent this long is marked Crashed and dispatched again; at least four times "
                    "the server's event flush interval (20 s at Prefect's default 5 s), checked before the data "
                    "is validated")
    api_outage_minutes: float = Field(10, ge=0, title="API outage waited out (min)",
                                      description="how long an unreachable Prefect API is waited out")
    unstarted_backoff_seconds: float = Field(
        60, ge=0, title="Wait after an attempt that never ran (s)",
        description="before dispatching again after an attempt lost before it ran (its clone failed, its "
                    "process never started); doubled for each such attempt in a row")

    def to_config(self) -> DispatchConfig:
        return DispatchConfig(timeout_s=self.timeout_minutes * 60, attempts=self.attempts, poll_s=self.poll_seconds,
                              lost_after_s=self.lost_after_seconds, api_outage_s=self.api_outage_minutes * 60,
                              unstarted_backoff_s=self.unstarted_backoff_seconds)


class GateParams(BaseModel):
    """When the challenger replaces the champion (scores are holdout F1, 0-1)."""

    min_score: float = Field(GateConfig.min_score, ge=0, le=1, title="Minimum score")
    min_gain: float = Field(GateConfig.min_gain, ge=-1, le=1, title="Minimum gain over the champion")
    max_class_drop: float = Field(GateConfig.max_class_drop, ge=0, le=1, title="Maximum F1 drop on any class")
    metric: Literal["f1_samples", "f1_micro", "f1_macro", "course_f_score"] = Field(
        "f1_samples", title="Gate metric")
    min_rows: int = Field(GateConfig.min_rows, ge=1, title="Minimum rows for a comparison",
                          description="fewer rows that neither model trained on and the champion stays")
    resamples: int = Field(GateConfig.resamples, ge=100, le=100_000, title="Bootstrap resamples")
    confidence: float = Field(GateConfig.confidence, ge=0.5, lt=1, title="Bootstrap confidence",
                              description="the gain's interval at this level must clear the minimum gain")

    def to_config(self) -> GateConfig:
        return GateConfig(**self.model_dump())


class ValidationParams(BaseModel):
    """What the data must look like before anything is trained on it."""

    image_size: int = Field(512, ge=1, title="Expected image size (px)")
    check_pixels: bool = Field(True, title="Fully decode every image", description="catches truncated files")
    drift_alpha: float = Field(ValidationConfig.drift_alpha, gt=0, lt=1, title="Label drift significance level",
                               description="false-alarm rate of the drift test on undrifted data (Holm-corrected)")
    drift_min_relative_change: float = Field(
        ValidationConfig.drift_min_relative_change, ge=0, title="Smallest relative label-share change that is drift",
        description="0.25: a class share must move by a quarter of its reference value (and be significant)")
    drift_action: Literal["fail", "warn"] = Field("fail", title="On label drift")
    max_image_bytes: int = Field(ValidationConfig.max_image_bytes, ge=1, le=2**30, title="Largest image file (bytes)",
                                 description="larger files or zip members are refused without being read")

    def to_config(self) -> ValidationConfig:
        return ValidationConfig(**self.model_dump())
