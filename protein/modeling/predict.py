"""Inference: `Predictor.from_checkpoint` is the one way in. It rebuilds the model from what
the model version's model.json says and applies the same preset training used."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from protein.errors import RecordError, RegistryError
from protein.evaluation.metrics import binarize
from protein.labels import LABELS, format_label_set
from protein.modeling.model import build_model
from protein.modeling.presets import EvalPreset
from protein.modeling.train import predict_probs, select_device
from protein.registry import SPEC_FILE, WEIGHTS_FILE, check_local_weights

log = logging.getLogger(__name__)


def label_strings(probs: np.ndarray, thresholds: np.ndarray) -> list[str]:
    """Tuned per-class thresholds; an image never goes without a label (top class)."""
    predicted = binarize(probs, thresholds, ensure_one=True)
    return [format_label_set(np.flatnonzero(row)) for row in predicted]


def _numbers(value: Any, count: int) -> bool:
    return (isinstance(value, list) and len(value) == count
            and all(isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) for x in value))


def check_inference_fields(spec: dict[str, Any], where: str) -> None:
    """RecordError naming `where` unless the record holds what prediction reads beyond the schema's
    required fields: the normalization training used and one threshold per class. A version
    registered without them passed every record check, then failed mid-prediction with a KeyError
    traceback (or a shape error naming neither the version nor its record)."""
    norm = spec.get("normalization")
    if not (isinstance(norm, dict) and _numbers(norm.get("mean"), 3) and _numbers(norm.get("std"), 3)
            and all(x > 0 for x in norm["std"])):
        raise RecordError(f"{where}: normalization must be {{mean: 3 numbers, std: 3 positive numbers}}, "
                          f"got {str(norm)[:80]}")
    thresholds = spec.get("thresholds")
    if not (_numbers(thresholds, len(LABELS)) and all(0 <= t <= 1 for t in thresholds)):
        shown = f"{len(thresholds)} values" if isinstance(thresholds, list) else str(thresholds)[:40]
        raise RecordError(f"{where}: thresholds must be {len(LABELS)} numbers in [0, 1], one per class, got {shown}")


@dataclass
class Predictor:
    model: nn.Module
    spec: dict[str, Any]
    device: torch.device

    @property
    def image_size(self) -> int:
        return int(self.spec["image_size"])

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.spec["thresholds"], dtype=np.float32)

    @property
    def tta(self) -> bool:
        """Versions trained with TTA predict with it (the mean of the 8 dihedral views)."""
        return bool(self.spec.get("tta", False))

    @property
    def preset(self) -> EvalPreset:
        norm = self.spec["normalization"]
        return EvalPreset(mean=tuple(norm["mean"]), std=tuple(norm["std"]), channels_last=self.channels_last)

    @property
    def channels_last(self) -> bool:
        """As training runs on a GPU: NHWC activations, which cuDNN's convolutions prefer."""
        return self.device.type == "cuda"

    @classmethod
    def from_checkpoint(cls, model_dir: Path, device: str = "auto") -> Predictor:
        """Load a model version folder (model.json + model.safetensors)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        spec = json.loads((model_dir / SPEC_FILE).read_text())
        if list(spec.get("class_names", [])) != list(LABELS):
            raise RegistryError(f"{model_dir}: model classes {spec.get('class_names')} differ from {list(LABELS)}")
        check_inference_fields(spec, str(model_dir / SPEC_FILE))
        # Checked again at load, not only at download: a cached folder may have been altered since.
        check_local_weights(model_dir, spec)
        try:
            state = load_file(str(model_dir / WEIGHTS_FILE))
        except (SafetensorError, OSError) as exc:
            raise RegistryError(f"{model_dir / WEIGHTS_FILE}: unreadable weights ({exc})") from None
        model = build_model(spec["arch"], len(LABELS), image_size=int(spec["image_size"]))
        own = model.state_dict()
        mismatched = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
        if mismatched:
            raise RegistryError(
                f"{model_dir}: weights do not match architecture {spec['arch']!r} "
                f"({len(mismatched)} tensors differ, e.g. {mismatched[0]})"
            )
        model.load_state_dict(state)
        target = select_device(device)
        model = model.to(target).eval()
        if target.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return cls(model=model, spec=spec, device=target)

    def predict_probs(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, S, S, 3) uint8 at this model's image size -> (N, C) probabilities."""
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected (N, {self.image_size}, {self.image_size}, 3) uint8 images, got {images.shape}")
        return predict_probs(self.model, images, self.preset, self.device, batch_size, tta=self.tta)

    def label_strings(self, probs: np.ndarray) -> list[str]:
        return label_strings(probs, self.thresholds)

    def submission(self, image_ids: list[str], images: np.ndarray) -> pd.DataFrame:
        labels = self.label_strings(self.predict_probs(images))
        return pd.DataFrame({"Image": image_ids, "Label": labels})
