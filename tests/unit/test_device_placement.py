"""Every tensor that crosses ranks lives on the device the ranks communicate on, and the training
step never waits for the device, for both recipes. Checked on the CPU with torch's `meta` device
standing in for a GPU: a tensor left on the host shows up as a CPU tensor among meta ones, and a
copy between host and device or a read of a device value shows up as an operator on the way
(TorchDispatchMode sees every operator, backward and optimizer included)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from protein.config import TrainConfig, recipe_config
from protein.labels import NUM_CLASSES
from protein.modeling import distributed
from protein.modeling.ema import make_ema
from protein.modeling.model import build_model
from protein.modeling.train import build_training, train_step

META = torch.device("meta")


def tiny(recipe: str) -> TrainConfig:
    # The recipe's step (arch, jitter, EMA, loss, accumulation) at a size a meta run builds quickly.
    return recipe_config(recipe, image_size=32, weights="none", batch_size=8, min_batch_per_rank=1, device="cpu")


@pytest.mark.parametrize("recipe", ["default", "winner"])
def test_everything_rank_zero_broadcasts_lives_on_the_models_device(recipe: str):
    run = build_training(tiny(recipe), META, n_train=64)
    assert (run.ema is not None) == (recipe == "winner")
    for module in (run.model, run.ema) if run.ema is not None else (run.model,):
        off = {name: t.device for name, t in module.state_dict().items() if t.device != META}
        assert not off, off  # was: the EMA's n_averaged on the CPU, which NCCL refuses
        distributed.sync_from_main(module, META)  # the check fit runs before broadcasting


def test_the_average_and_its_counter_are_made_on_the_models_device():
    model = build_model("resnet18", NUM_CLASSES).to(META)
    ema = make_ema(model, 0.9)
    assert {t.device for t in ema.state_dict().values()} == {META}
    assert ema.n_averaged.device == META


def test_a_host_tensor_about_to_cross_ranks_is_refused_by_name():
    model = torch.nn.Linear(2, 2).to(META)
    model.register_buffer("counter", torch.zeros((), dtype=torch.long))  # on the CPU, as AveragedModel made it
    with pytest.raises(ValueError, match="tensor 'counter' lives on cpu but the ranks communicate on meta"):
        distributed.sync_from_main(model, META)
    with pytest.raises(ValueError, match="all_reduce_sum: tensor 'sum' lives on cpu"):
        distributed.all_reduce_sum(torch.zeros(2), META)


class HostTraffic(TorchDispatchMode):
    """Records copies between the host and another device and reads of device values (`.item()`,
    `bool()`, `.tolist()`: each one a host sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense" and tensors[0].device.type != "cpu":
            self.seen.append(f"read of a {tensors[0].device} value")
        if name in ("_to_copy", "copy_"):
            source = tensors[-1].device
            target = kwargs.get("device") or (tensors[0].device if name == "copy_" else source)
            if torch.device(target).type != source.type:
                self.seen.append(f"{name} {source} -> {target}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("recipe", ["default", "winner"])
def test_the_training_step_neither_copies_to_the_host_nor_reads_from_the_device(recipe: str):
    config = tiny(recipe)
    run = build_training(config, META, n_train=64)
    images = torch.empty((8, 32, 32, 3), dtype=torch.uint8, device=META)  # the batch is already on the device
    targets = torch.empty((8, NUM_CLASSES), device=META)
    host = torch.Generator().manual_seed(0)

    def step() -> None:
        train_step(run.step_model, images, targets, run.optimizer, run.scheduler, run.loss_fn, run.train_preset,
                   META, host, run.ema, config.accumulate)

    step()  # once per run, not per step: the normalisation constants are copied to the device and cached
    with HostTraffic() as traffic:
        for _ in range(3):
            step()
    assert traffic.seen == []  # was: the jitter factors, drawn on the host, copied each step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["default", "winner"])
def test_the_training_step_has_no_host_sync_on_a_gpu(recipe: str):
    device = torch.device("cuda")
    config = tiny(recipe)
    run = build_training(config, device, n_train=64)
    images = torch.randint(0, 255, (8, 32, 32, 3), dtype=torch.uint8, device=device)
    targets = (torch.rand((8, NUM_CLASSES), device=device) > 0.8).float()
    host, on_device = torch.Generator().manual_seed(0), torch.Generator(device=device).manual_seed(0)
    train_step(run.step_model, images, targets, run.optimizer, run.scheduler, run.loss_fn, run.train_preset,
               device, host, run.ema, config.accumulate, on_device)  # lazy CUDA initialisation outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            train_step(run.step_model, images, targets, run.optimizer, run.scheduler, run.loss_fn, run.train_preset,
                       device, host, run.ema, config.accumulate, on_device)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_unindexed_cuda_device_names_the_current_gpu():
    # The first real GPU run refused every step: tensors report `cuda:0`, the trainer passed `cuda`.
    from protein.modeling.train import select_device

    assert select_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    distributed.require_on(torch.device("cuda"), {"sum": torch.zeros(2, device="cuda")}, "all_reduce_sum")
    with pytest.raises(ValueError, match="tensor 'sum' lives on cpu but the ranks communicate on cuda"):
        distributed.require_on(torch.device("cuda"), {"sum": torch.zeros(2)}, "all_reduce_sum")
