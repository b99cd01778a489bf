"""How a recipe scales with the hardware: the global batch split over ranks, the learning rate
scaled with the global batch, and the weights' moving average expressed in epochs so its memory
does not depend on how many steps an epoch has. Pure functions over plain numbers.

A recipe is written for a reference global batch (32 for both recipes here). Run it on 8 GPUs at
batch 256 and an epoch has 8x fewer steps: a per-step EMA decay of 0.999 would then keep 46 %
weight on the first steps' weights after 26 epochs of 15,000 rows (a random head), and the peak
learning rate tuned at batch 32 would be too small for the larger batch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protein.config import TrainConfig

LR_SCALING_RULES = ("none", "sqrt", "linear")
# timm's / TensorFlow's EMA warm-up: the decay ramps up as (1 + k) / (10 + k), so the average
# starts from the trained weights instead of carrying the random initialisation for thousands of steps.
EMA_WARMUP_OFFSET = 10


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: full global batches only (the ragged rest is dropped),
    or one batch of everything when there is less than one batch."""
    return max(n_train // batch_size, 1)


def check_batch_split(config: TrainConfig, world_size: int) -> int:
    """The micro-batch one rank runs per forward pass: the global batch split over the ranks
    and then over the accumulation steps, which must divide it evenly (the learning-rate
    schedule and the recorded batch are per global batch, whatever the hardware), and must
    not fall below the recipe's per-rank floor unless BatchNorm is synchronised."""
    parts = world_size * config.accumulate
    if config.batch_size % parts:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be a multiple of nproc x "
                         f"accumulate = {world_size} x {config.accumulate}")
    micro = config.batch_size // parts
    if micro < config.min_batch_per_rank and not (config.sync_bn and world_size > 1):
        need = config.min_batch_per_rank * parts
        raise ValueError(f"batch_size {config.batch_size} over nproc x accumulate = {world_size} x "
                         f"{config.accumulate} leaves {micro} images per rank, below this recipe's floor of "
                         f"{config.min_batch_per_rank} (BatchNorm statistics of so few images are noise); use "
                         f"--batch-size {need} or more, fewer processes, or --sync-bn")
    return micro


def scaled_lr(lr: float, global_batch: int, reference_batch: int, rule: str) -> float:
    """The peak learning rate at `global_batch` for a recipe tuned at `reference_batch`:
    'linear' (Goyal et al. 2017, SGD), 'sqrt' (Krizhevsky 2014; the rule for Adam-type optimisers,
    Malladi et al. 2022) or 'none' (lr as given)."""
    if rule not in LR_SCALING_RULES:
        raise ValueError(f"lr scaling rule must be one of {', '.join(LR_SCALING_RULES)}, got {rule!r}")
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got {global_batch} and {reference_batch}")
    ratio = global_batch / reference_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    return lr


def ema_decay_per_step(half_life_epochs: float, steps_per_epoch: int) -> float:
    """The per-step decay whose weight on a step halves after `half_life_epochs` epochs, whatever
    the number of steps in an epoch (0 half-life: no average)."""
    if half_life_epochs <= 0:
        return 0.0
    return 0.5 ** (1.0 / (half_life_epochs * max(steps_per_epoch, 1)))


def ema_decay_at(update: int, decay: float) -> float:
    """The decay of update number `update` (0 for the first, which copies the weights):
    min(decay, (1 + k) / (10 + k)) for k = update - 1 afterwards."""
    if update <= 0:
        return 0.0
    k = update - 1
    return min(decay, (1 + k) / (EMA_WARMUP_OFFSET + k))


def weight_on_first_step(decay: float, steps: int) -> float:
    """Weight the average still puts on the first update's weights after `steps` updates with a
    constant per-step decay (what the shipped weights remember of a random head)."""
    return decay ** max(steps - 1, 0)
