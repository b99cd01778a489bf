"""The names of torchvision's classification architectures, without importing torchvision.

A config checks its architecture when it is built, and configs are built on hosts that never
build a model: the CPU host's retrain checks a challenger's recipe before dispatching it to a GPU
host, and importing torchvision to read its registry cost that flow run 1.5-2.5 s of CPU. The list
is torchvision's own (`list_models(module=torchvision.models)`) for the pinned version; a unit test
(tests/unit/test_model.py) compares it with the registry, so an upgrade that adds or drops a
model fails there, not at 02:00.
"""

from __future__ import annotations

import difflib

TORCHVISION_ARCHITECTURES = (
    "alexnet", "convnext_base", "convnext_large", "convnext_small", "convnext_tiny", "densenet121",
    "densenet161", "densenet169", "densenet201", "efficientnet_b0", "efficientnet_b1", "efficientnet_b2",
    "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "googlenet", "inception_v3", "maxvit_t",
    "mnasnet0_5", "mnasnet0_75", "mnasnet1_0", "mnasnet1_3", "mobilenet_v2", "mobilenet_v3_large",
    "mobilenet_v3_small", "regnet_x_16gf", "regnet_x_1_6gf", "regnet_x_32gf", "regnet_x_3_2gf",
    "regnet_x_400mf", "regnet_x_800mf", "regnet_x_8gf", "regnet_y_128gf", "regnet_y_16gf", "regnet_y_1_6gf",
    "regnet_y_32gf", "regnet_y_3_2gf", "regnet_y_400mf", "regnet_y_800mf", "regnet_y_8gf", "resnet101",
    "resnet152", "resnet18", "resnet34", "resnet50", "resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0", "squeezenet1_0",
    "squeezenet1_1", "swin_b", "swin_s", "swin_t", "swin_v2_b", "swin_v2_s", "swin_v2_t", "vgg11", "vgg11_bn",
    "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vit_b_16", "vit_b_32", "vit_h_14",
    "vit_l_16", "vit_l_32", "wide_resnet101_2", "wide_resnet50_2"
)


def architectures() -> tuple[str, ...]:
    """Every torchvision classification architecture name, sorted."""
    return TORCHVISION_ARCHITECTURES


def check_arch(arch: str) -> str:
    """The name itself, or ValueError with the closest registered names."""
    if arch not in TORCHVISION_ARCHITECTURES:
        close = difflib.get_close_matches(arch, TORCHVISION_ARCHITECTURES, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise ValueError(f"unknown architecture {arch!r}: {hint}(any of torchvision's {len(TORCHVISION_ARCHITECTURES)} "
                         "classification models, e.g. resnet18, efficientnet_b1, convnext_tiny; "
                         "`protein archs` lists them)")
    return arch
