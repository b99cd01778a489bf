"""An exponential moving average of a model's weights and buffers that lives on the model's device.

torch.optim.swa_utils.AveragedModel, used before, made its step counter on the CPU (built with
device=None): under DDP the counter was broadcast with the weights, and NCCL refuses a CPU
tensor; each update also copied the counter to the GPU once per dtype group and read it back
(`if n_averaged == 0`), a host sync per step. Here the counter is a device buffer that is only
written on the device, its host mirror decides the decay, and the update is one `_foreach_lerp_`
per (device, dtype) group: no host sync. The decay warms up (protein.modeling.scaling.ema_decay_at).
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from protein.modeling.scaling import ema_decay_at


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.state_dict().values():
        return tensor.device
    return torch.device("cpu")


class ExponentialMovingAverage(nn.Module):
    """`ema.module` holds the average; `ema.update_parameters(model)` after each optimizer step.
    Its state_dict (`module.*` and `n_averaged`) is what the checkpoint saves."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = decay
        # On the model's device: it is broadcast with the weights, and NCCL moves device tensors only.
        self.register_buffer("n_averaged", torch.zeros((), dtype=torch.long, device=_device_of(model)))
        self.updates = 0  # host mirror of n_averaged: the decay is decided without reading the device

    def _pairs(self, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        mine = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        if len(mine) != len(theirs):
            raise ValueError(f"EMA of a model with {len(mine)} tensors updated from one with {len(theirs)}")
        return zip(mine, (t.detach() for t in theirs), strict=True)

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        decay = ema_decay_at(self.updates, self.decay)
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(
            lambda: ([], []))
        for average, current in self._pairs(model):
            if average.is_floating_point():
                mine, theirs = groups[(average.device, average.dtype)]
                mine.append(average)
                theirs.append(current)
            else:  # counters such as BatchNorm's num_batches_tracked: the latest value
                average.copy_(current, non_blocking=True)
        for mine, theirs in groups.values():
            torch._foreach_lerp_(mine, theirs, 1.0 - decay)
        self.n_averaged.add_(1)
        self.updates += 1

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.updates = int(self.n_averaged)  # once, at resume: not in the step
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def make_ema(model: nn.Module, decay: float) -> ExponentialMovingAverage:
    """The moving average of `model`, on the model's device, updated after each optimizer step."""
    return ExponentialMovingAverage(model, decay)
