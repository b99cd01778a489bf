"""Backbones with a multi-label head. Weights are never downloaded: None trains from scratch,
a local file (safetensors or a plain state dict) initialises the backbone."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from protein.config import ARCHITECTURES
from protein.errors import DataError
from protein.labels import NUM_CLASSES

log = logging.getLogger(__name__)


def build_model(arch: str, num_classes: int = NUM_CLASSES, weights: str | None = None) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r} (expected one of {', '.join(ARCHITECTURES)})")
    import torchvision.models as tvm  # torchvision costs seconds to import; only pay when building

    model: nn.Module = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if weights:
        load_backbone_weights(model, Path(weights))
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a torch file loaded without unpickling code."""
    if not path.is_file():
        raise DataError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise DataError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses arbitrary pickles with an UnpicklingError
        raise DataError(f"{path}: not a plain tensor state dict ({type(exc).__name__})") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict of tensors")
    return state


def load_backbone_weights(model: nn.Module, path: Path) -> None:
    """Load pretrained weights, skipping the classifier whose shape differs (10 classes here)."""
    state = read_state_dict(path)
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    if not usable:
        raise DataError(f"{path}: no tensor matches the model's layers (wrong architecture?)")
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors from %s (skipped %d: %s)", len(usable), path, len(skipped), skipped[:4])
