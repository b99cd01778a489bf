"""Backbones from torchvision's registry: every classification name builds with a 10-logit head;
ImageNet weights come from a (temporary) TORCH_HOME and must fit the whole backbone."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.regnet import BlockParams

from protein.config import TrainConfig
from protein.errors import DataError
from protein.modeling.arch_names import architectures, check_arch
from protein.modeling.model import build_model, imagenet_weights, replace_head


@pytest.fixture
def meta_safe_regnet(monkeypatch: pytest.MonkeyPatch) -> None:
    """RegNet's builder computes its block widths with torch ops and reads them back (.tolist()),
    which a meta tensor cannot do: run that arithmetic on the CPU while the layers stay on meta."""
    original = BlockParams.from_init_params.__func__  # type: ignore[attr-defined]

    def on_cpu(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    monkeypatch.setattr(BlockParams, "from_init_params", classmethod(on_cpu))


def test_the_registry_lists_every_torchvision_classification_model():
    """The names are kept without importing torchvision (arch_names.py): they must be the pinned
    torchvision's registry, exactly."""
    names = architectures()
    assert names == tuple(sorted(torchvision.models.list_models(module=torchvision.models)))
    for family in ("resnet18", "resnext50_32x4d", "wide_resnet50_2", "efficientnet_b0", "efficientnet_b7",
                   "efficientnet_v2_s", "convnext_tiny", "regnet_y_800mf", "vit_b_16", "swin_t", "maxvit_t",
                   "mobilenet_v3_large", "densenet121", "squeezenet1_0", "googlenet", "inception_v3"):
        assert family in names
    assert not any(n.startswith(("fasterrcnn", "deeplab", "r3d", "quantized")) for n in names)


def test_every_architecture_builds_with_a_ten_logit_head(meta_safe_regnet):
    # On the meta device: shapes only, no memory and no arithmetic, so all 80 models take seconds.
    # The meta device has no values, so "a logit can be negative" is checked by what runs after the
    # head: an activation there (SqueezeNet's ReLU) kept every sigmoid probability >= 0.5.
    failures = []
    for arch in architectures():
        with torch.device("meta"):
            model = build_model(arch, 10, image_size=224).eval()
            called: list[tuple[str, nn.Module]] = []
            for name, module in model.named_modules():
                if not list(module.children()):
                    module.register_forward_hook(lambda m, i, o, n=name, seen=called: seen.append((n, m)))
            logits = model(torch.empty(2, 3, 224, 224))
        if tuple(logits.shape) != (2, 10):
            failures.append(f"{arch}: {tuple(logits.shape)}")
        heads = [i for i, (_, m) in enumerate(called)
                 if isinstance(m, nn.Linear | nn.Conv2d) and 10 in (getattr(m, "out_features", None),
                                                                    getattr(m, "out_channels", None))]
        after_head = [n for n, m in called[heads[-1] + 1:] if type(m).__module__ == nn.modules.activation.__name__]
        if after_head:
            failures.append(f"{arch}: activation after the head: {after_head}")
    assert failures == []
    with torch.device("meta"):  # ViT is built for the training size, not only ImageNet's 224
        assert build_model("vit_b_32", 10, image_size=64).eval()(torch.empty(1, 3, 64, 64)).shape == (1, 10)


def test_a_small_model_runs_for_real_at_training_sizes():
    for arch, size in (("resnet18", 32), ("efficientnet_b0", 32)):
        model = build_model(arch, 10, image_size=size).eval()
        with torch.no_grad():
            assert model(torch.rand(1, 3, size, size)).shape == (1, 10), arch


def test_replace_head_handles_a_convolutional_classifier():
    model = torchvision.models.squeezenet1_1(weights=None)
    assert replace_head(model, 10) == "classifier.1"
    with torch.no_grad():
        logits = model.eval()(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 10)
    assert (logits < 0).any(), "the ReLU after the classifier kept every probability >= 0.5"


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean .*efficientnet_b1"):
        check_arch("efficientnet-b1")
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        TrainConfig(arch="resnet19")
    assert TrainConfig(arch="convnext_tiny").arch == "convnext_tiny"  # not in the curated UI list's way


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def place_imagenet_file(arch: str, state: dict[str, torch.Tensor] | None = None):
    """Put a randomly initialised 1000-class state dict where torchvision's cache keeps arch's
    ImageNet file (its name comes from the weights enum's URL)."""
    weights = imagenet_weights(arch)
    weights.path.parent.mkdir(parents=True, exist_ok=True)
    if state is None:
        torch.manual_seed(1)
        state = torchvision.models.get_model(arch, weights=None).state_dict()
    torch.save(state, weights.path)
    return weights, state


def test_imagenet_weights_load_from_torch_home(torch_home):
    weights, state = place_imagenet_file("resnet18")
    assert weights.path == torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights.enum_name == "ResNet18_Weights.IMAGENET1K_V1"
    model = build_model("resnet18", 10, "imagenet")
    own = model.state_dict()
    for key, tensor in state.items():
        if not key.startswith("fc."):
            assert torch.equal(own[key], tensor), key
    assert own["fc.weight"].shape == (10, 512)  # the head is new; only it may differ


def test_efficientnet_b1_imagenet_file_name_is_torchvisions(torch_home):
    weights = imagenet_weights("efficientnet_b1")
    assert weights.path == torch_home / "hub" / "checkpoints" / "efficientnet_b1-c27df63c.pth"
    assert weights.url.endswith("/efficientnet_b1-c27df63c.pth")


def test_missing_imagenet_file_says_which_file_to_place_where(torch_home):
    with pytest.raises(DataError, match="resnet18-f37072fd.pth") as info:
        build_model("resnet18", 10, "imagenet")
    message = str(info.value)
    assert "resnet18-f37072fd.pth" in message and str(torch_home / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message and "\n" not in message


def test_a_partial_fit_is_refused_naming_the_mismatches(torch_home):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["layer4.1.bn2.running_var"]
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a one-channel stem
    place_imagenet_file("resnet18", state)
    with pytest.raises(DataError, match="2 backbone tensors differ") as info:
        build_model("resnet18", 10, "imagenet")
    message = str(info.value)
    assert "2 backbone tensors differ" in message
    assert "conv1.weight has shape (64, 1, 7, 7), the model (64, 3, 7, 7)" in message
    assert "layer4.1.bn2.running_var missing" in message


def test_another_architectures_file_is_refused(torch_home, tmp_path):
    path = tmp_path / "resnet34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(DataError, match=r"does not fit resnet18 \(\d+ backbone tensors differ: .*is not in the model"):
        build_model("resnet18", 10, str(path))


def test_a_local_file_of_a_ten_class_model_loads_head_and_all(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    source = build_model("resnet18", 10)
    path = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_model("resnet18", 10, str(path))
    for key, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_a_pickled_weights_file_is_not_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(1), "hook": print}, path)  # a callable needs full unpickling
    with pytest.raises(DataError, match="not a plain tensor state dict"):
        build_model("resnet18", 10, str(path))


def test_protein_archs_lists_the_registry(capsys):
    import json

    from protein.cli import main

    assert main(["archs"]) == 0
    assert tuple(json.loads(capsys.readouterr().out)) == architectures()


@pytest.mark.parametrize(("arch", "size", "named"), [("convnext_tiny", 16, "Kernel size can't be greater"),
                                                     ("vit_b_16", 24, "Input shape indivisible by patch size"),
                                                     ("inception_v3", 64, "Kernel size can't be greater")])
def test_a_size_an_architecture_cannot_take_is_refused_before_the_data_is_opened(
        arch: str, size: int, named: str, tmp_path) -> None:
    from protein.config import TrainConfig
    from protein.pipeline import train_and_register

    # Training met it at its first step, after decoding: a traceback, exit 1.
    with pytest.raises(ValueError, match=f"^{arch} cannot take {size} px images \\(.*{named}"):
        train_and_register(tmp_path / "never-opened", str(tmp_path / "store"),
                           TrainConfig(arch=arch, image_size=size, device="cpu"))
    assert not (tmp_path / "store").exists()


def test_sizes_the_architectures_take_pass_the_check() -> None:
    from protein.modeling.model import check_input_size

    for arch, size in (("convnext_tiny", 32), ("vit_b_16", 32), ("resnet18", 16), ("efficientnet_b0", 16),
                       ("regnet_y_400mf", 32)):  # RegNet: the meta device cannot build it, so no refusal
        check_input_size(arch, size)
