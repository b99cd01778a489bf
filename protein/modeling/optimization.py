"""What training minimises and how it steps: the loss, AdamW's parameter groups and the one-cycle
schedule at the learning rate scaled for the global batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from protein.config import TrainConfig
from protein.modeling.scaling import scaled_lr


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017) on logits, mean over all labels."""

    def __init__(self, gamma: float = 2.0) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_t = torch.exp(-bce)
        # Floored: at a confident logit p_t rounds to 1, and (1 - p_t) ** gamma with gamma < 1 has an
        # infinite derivative at 0 (a NaN gradient from a loss of ~0.005).
        return ((1 - p_t).clamp_min(1e-12) ** self.gamma * bce).mean()


def make_loss(config: TrainConfig) -> nn.Module:
    return FocalLoss(config.focal_gamma) if config.loss == "focal" else nn.BCEWithLogitsLoss()


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay for weight matrices and kernels only: decaying norm scales and biases
    (every 0- and 1-D parameter) pulls them towards zero for no regularising benefit."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> tuple[
    torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler
]:
    peak_lr = scaled_lr(config.lr, config.batch_size, config.lr_reference_batch, config.lr_scaling)
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=peak_lr)
    # OneCycleLR divides by the length of each phase; tiny runs (a few steps) would make a
    # phase empty, so the schedule is planned over at least 8 steps.
    total_steps = max(config.epochs * steps_per_epoch, 8)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak_lr, total_steps=total_steps,
                                                    pct_start=0.25)
    return optimizer, scheduler
