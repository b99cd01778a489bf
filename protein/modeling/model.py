"""Backbones from torchvision's model registry with a multi-label head.

Every classification architecture torchvision registers (`list_models(module=torchvision.models)`:
resnet*, resnext*, wide_resnet*, efficientnet_b0-b7, efficientnet_v2_*, convnext_*, regnet_*,
mobilenet*, densenet*, vit_*, swin*, maxvit_t, ...) is accepted by name. `replace_head` is the one
place that turns torchvision's 1000-class ImageNet classifier into a 10-logit layer.

Weights are never downloaded: None trains from scratch, "imagenet" reads torchvision's weights
file for the architecture from torchvision's local cache ($TORCH_HOME/hub/checkpoints), and any
other value is a local file (safetensors or a plain state dict). Pretrained weights must fit the
whole backbone (every tensor by name and shape); only the classifier head may differ.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from protein.errors import DataError
from protein.labels import NUM_CLASSES
from protein.modeling.arch_names import check_arch

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
IMAGENET_CLASSES = 1000
# GoogLeNet and Inception v3 train auxiliary classifiers on ImageNet; we build them without
# (their outputs would be a tuple in train mode), so their tensors in an ImageNet file are skipped.
AUX_HEAD_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")
# Old DenseNet checkpoints name "norm.1" what the module calls "norm1" (torchvision remaps the same way).
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
# How many mismatching names an error quotes: enough to recognise the cause, short enough for one line.
_QUOTED = 3


def _builder_kwargs(arch: str, image_size: int | None) -> dict[str, object]:
    if arch in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    if arch.startswith("vit_") and image_size is not None:
        # ViT's position embedding is sized for one input size; build it for the training size.
        return {"image_size": image_size}
    return {}


def _head_name(model: nn.Module) -> str:
    """The module that produces torchvision's 1000 ImageNet logits: a Linear for every family but
    SqueezeNet, whose classifier is a 1x1 convolution."""
    names = [name for name, module in model.named_modules()
             if (isinstance(module, nn.Linear) and module.out_features == IMAGENET_CLASSES)
             or (isinstance(module, nn.Conv2d) and module.out_channels == IMAGENET_CLASSES)]
    if len(names) != 1:
        raise ValueError(f"{type(model).__name__}: expected one 1000-class classifier layer, found {names}")
    return names[0]


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Swap the ImageNet classifier for a freshly initialised num_classes layer; return its name."""
    name = _head_name(model)
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    setattr(parent, child, new)
    if isinstance(parent, nn.Sequential):
        # SqueezeNet's classifier is conv -> ReLU -> pool: harmless before ImageNet's softmax, but a
        # logit kept >= 0 is a sigmoid probability >= 0.5 for every class, so a negative could never
        # be predicted. Whatever follows our head in its block must stay linear.
        after = list(parent._modules)[list(parent._modules).index(child) + 1:]
        for key in after:
            if _is_activation(parent.get_submodule(key)):
                setattr(parent, key, nn.Identity())
    return name


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ == nn.modules.activation.__name__


def build_model(arch: str, num_classes: int = NUM_CLASSES, weights: str | None = None,
                image_size: int | None = None) -> nn.Module:
    """A torchvision backbone with a num_classes head, from scratch or from `weights`
    (None, "imagenet" or a local file)."""
    import torchvision.models as tvm

    check_arch(arch)
    model = tvm.get_model(arch, weights=None, **_builder_kwargs(arch, image_size))
    name = replace_head(model, num_classes)
    if weights:
        path = imagenet_weights_path(arch) if weights == IMAGENET else Path(weights)
        load_backbone_weights(model, path, head=name, arch=arch)
    return model


def check_input_size(arch: str, image_size: int) -> None:
    """ValueError naming the architecture and the size when it cannot take image_size px images
    (convnext below 32 px, inception_v3 below 75, ViT at a size its patch does not divide): found
    by a forward pass on the meta device (shapes only, no memory or arithmetic: well under a second),
    before hours of decoding, where training met it at its first step with a traceback. A builder
    the meta device cannot run (RegNet reads its widths back) is left for training to tell."""
    import torch

    def refused(exc: BaseException) -> ValueError:
        lines = str(exc).strip().splitlines()
        return ValueError(f"{arch} cannot take {image_size} px images ({lines[0] if lines else type(exc).__name__}); "
                          "choose a larger image size or another architecture")

    try:
        with torch.device("meta"):
            model = build_model(arch, NUM_CLASSES, image_size=image_size).eval()
    except (AssertionError, ValueError) as exc:  # the builder's own check (ViT: a patch must divide it)
        raise refused(exc) from None
    except Exception:  # noqa: BLE001 - the meta device cannot run this builder: no answer here
        return
    try:
        with torch.device("meta"):
            model(torch.empty(2, 3, image_size, image_size))
    except NotImplementedError:
        return
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise refused(exc) from None


@dataclass(frozen=True)
class ImagenetWeights:
    enum_name: str  # e.g. EfficientNet_B1_Weights.IMAGENET1K_V2
    url: str
    path: Path  # where torchvision's cache keeps the file


def imagenet_weights(arch: str) -> ImagenetWeights:
    """torchvision's default ImageNet weights for arch and where its cache keeps them: the path
    `torchvision.models.get_model(arch, weights="DEFAULT")` would read before downloading."""
    import torchvision.models as tvm

    check_arch(arch)
    enum = tvm.get_model_weights(arch).DEFAULT
    filename = os.path.basename(urlparse(enum.url).path)
    path = Path(torch.hub.get_dir()) / "checkpoints" / filename  # $TORCH_HOME/hub/checkpoints
    return ImagenetWeights(f"{type(enum).__name__}.{enum.name}", enum.url, path)


def imagenet_weights_path(arch: str) -> Path:
    weights = imagenet_weights(arch)
    if not weights.path.is_file():
        raise DataError(f"ImageNet weights for {arch} are not in torchvision's cache: place {weights.path.name} "
                        f"(from {weights.url}) at {weights.path} (set TORCH_HOME to use another cache); "
                        "nothing is downloaded")
    return weights.path


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
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{path}: expected a state dict of tensors")
    return state


def _normalise_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(AUX_HEAD_PREFIXES):
            continue
        match = _DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def backbone_mismatches(own: dict[str, torch.Tensor], given: dict[str, torch.Tensor], head: str) -> list[str]:
    """Why `given` does not fit the backbone of `own`, one entry per tensor (empty when it fits).
    Tensors of the head module (name prefix `head.`) may differ or be absent."""
    def in_head(key: str) -> bool:
        return bool(head) and key.startswith(head + ".")

    problems: list[str] = []
    for key, tensor in own.items():
        if in_head(key):
            continue
        if key not in given:
            problems.append(f"{key} missing")
        elif tuple(given[key].shape) != tuple(tensor.shape):
            problems.append(f"{key} has shape {tuple(given[key].shape)}, the model {tuple(tensor.shape)}")
    problems += [f"{key} is not in the model" for key in given if key not in own and not in_head(key)]
    return problems


def load_backbone_weights(model: nn.Module, path: Path, head: str, arch: str = "") -> None:
    """Load pretrained weights into every backbone tensor; the head keeps its initialisation
    unless the file's head has the same shape (a 10-class model of the same architecture)."""
    state = _normalise_keys(read_state_dict(path))
    own = model.state_dict()
    problems = backbone_mismatches(own, state, head)
    if problems:
        quoted = "; ".join(problems[:_QUOTED]) + (f"; and {len(problems) - _QUOTED} more" if len(problems) > _QUOTED
                                                 else "")
        raise DataError(f"{path}: does not fit {arch or type(model).__name__} ({len(problems)} backbone tensors "
                        f"differ: {quoted}); only the classifier head may differ")
    usable = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)
    kept_head = sorted(k for k in own if k.startswith(head + ".") and k not in usable)
    log.info("loaded %d tensors from %s (head %s %s)", len(usable), path, head,
             "newly initialised" if kept_head else "loaded too")
