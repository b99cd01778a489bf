"""The arithmetic of a recipe that scales: learning rate with the global batch, the EMA in epochs
with warm-up, the per-rank batch floor."""

from __future__ import annotations

import pytest

from protein.config import TrainConfig, recipe_config
from protein.modeling.scaling import (
    check_batch_split,
    ema_decay_at,
    ema_decay_per_step,
    scaled_lr,
    weight_on_first_step,
)


def test_learning_rate_follows_the_global_batch_by_the_named_rule():
    assert scaled_lr(1e-3, 32, 32, "sqrt") == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 256, 32, "sqrt") == pytest.approx(1e-3 * 8**0.5)
    assert scaled_lr(1e-3, 256, 32, "linear") == pytest.approx(8e-3)
    assert scaled_lr(1e-3, 16, 32, "linear") == pytest.approx(5e-4)
    assert scaled_lr(1e-3, 256, 32, "none") == 1e-3
    with pytest.raises(ValueError, match="lr scaling rule must be one of none, sqrt, linear, got 'cubic'"):
        scaled_lr(1e-3, 256, 32, "cubic")


def test_the_average_forgets_the_same_share_per_epoch_at_any_batch():
    # The numbers: 0.999 per step kept 21 % (1,560 steps) or 46 % (780) on the first step.
    assert weight_on_first_step(0.999, 1_561) == pytest.approx(0.21, abs=0.005)
    assert weight_on_first_step(0.999, 781) == pytest.approx(0.458, abs=0.005)
    # In epochs, the memory is the same whatever the steps per epoch: after 26 epochs with a
    # 1.5-epoch half-life the first step's weight is 0.5 ** (26 / 1.5) at batch 32, 256 or 512.
    for steps in (480, 60, 30):
        decay = ema_decay_per_step(1.5, steps)
        assert weight_on_first_step(decay, 26 * steps + 1) == pytest.approx(0.5 ** (26 / 1.5), rel=1e-6)
    # The winner's half-life reproduces its original 0.999 at batch 32 on the competition's rows.
    assert ema_decay_per_step(1.5, 15_389 // 32) == pytest.approx(0.999, abs=5e-5)
    assert ema_decay_per_step(0.0, 480) == 0.0


def test_ema_warm_up_starts_from_the_trained_weights():
    assert ema_decay_at(0, 0.999) == 0.0  # the first update copies
    assert [round(ema_decay_at(k, 0.999), 4) for k in (1, 2, 9)] == [0.1, round(2 / 11, 4), 0.5]
    assert ema_decay_at(100_000, 0.999) == 0.999  # capped at the configured decay
    assert ema_decay_at(5, 0.2) == 0.2


def test_per_rank_batch_floor_is_one_clear_line_unless_batchnorm_is_synchronised():
    winner = recipe_config("winner")
    assert check_batch_split(winner, 4) == 8
    with pytest.raises(ValueError, match=r"batch_size 32 over nproc x accumulate = 8 x 1 leaves 4 images per rank, "
                                         r"below this recipe's floor of 8 .*use --batch-size 64 or more"):
        check_batch_split(winner, 8)
    assert check_batch_split(recipe_config("winner", sync_bn=True), 8) == 4
    # One process with accumulation: its micro-batch is what BatchNorm sees, floor applies too.
    with pytest.raises(ValueError, match="leaves 4 images per rank"):
        check_batch_split(recipe_config("winner", accumulate=8), 1)
    assert check_batch_split(TrainConfig(batch_size=8), 2) == 4


def test_scaling_options_are_validated():
    with pytest.raises(ValueError, match="lr_scaling must be one of none, sqrt, linear"):
        TrainConfig(lr_scaling="cubic")
    with pytest.raises(ValueError, match="min_batch_per_rank must be >= 1"):
        TrainConfig(min_batch_per_rank=0)
    with pytest.raises(ValueError, match="ema_half_life_epochs must be in"):
        TrainConfig(ema_half_life_epochs=-1)
