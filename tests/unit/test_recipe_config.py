"""Recipes are starting points: the CLI and the flow parameters overlay what the user gives."""

from __future__ import annotations

import pytest

from flows.params import TrainParams
from protein.cli import build_parser, train_config_from_args
from protein.config import TrainConfig, from_dict, recipe_config, to_dict


def cli_config(*argv: str) -> TrainConfig:
    return train_config_from_args(build_parser().parse_args(["train", "--data", "x", *argv]))


def test_winner_recipe_is_the_competition_recipe():
    config = recipe_config("winner")
    assert (config.arch, config.image_size, config.weights, config.epochs) == ("efficientnet_b1", 512, "imagenet", 26)
    assert config.ema_half_life_epochs > 0 and config.jitter > 0 and config.tta and config.recipe == "winner"


def test_cli_options_override_the_recipe_and_defaults_stay_the_recipes():
    assert cli_config() == TrainConfig()
    config = cli_config("--recipe", "winner", "--arch", "efficientnet_b2", "--image-size", "256", "--no-tta")
    assert (config.arch, config.image_size, config.tta, config.epochs) == ("efficientnet_b2", 256, False, 26)
    assert cli_config("--fold", "2/5").fold == 2 and cli_config("--fold", "2/5").folds == 5
    refit = cli_config("--thresholds-from", "a", "b")
    assert refit.refit and refit.thresholds_from == ("a", "b")


def test_bad_fold_and_refit_combinations_are_usage_errors():
    with pytest.raises(ValueError, match="i/K"):
        cli_config("--fold", "2-5")
    with pytest.raises(ValueError, match="fold must be 1..5"):
        cli_config("--fold", "6/5")
    with pytest.raises(ValueError, match="cannot also hold out a fold"):
        cli_config("--fold", "1/5", "--thresholds-from", "a")


def test_flow_parameters_take_the_recipe_for_empty_fields():
    assert TrainParams().to_config() == TrainConfig()
    config = TrainParams(recipe="winner", epochs=2).to_config()
    assert config.arch == "efficientnet_b1" and config.epochs == 2 and config.image_size == 512
    # What the UI sends back (every field, empty ones as null) rebuilds the same config.
    assert TrainParams(**TrainParams(recipe="winner").model_dump()).to_config() == recipe_config("winner")


def test_config_round_trips_through_json_types():
    config = recipe_config("default", refit=True, thresholds_from=("a", "b"))
    assert from_dict(TrainConfig, {**to_dict(config), "thresholds_from": ["a", "b"]}) == config


def test_the_ui_form_offers_exactly_the_configs_architectures() -> None:
    from typing import get_args

    from flows.params import Architecture
    from protein.config import ARCHITECTURES

    assert get_args(Architecture) == ARCHITECTURES


def test_the_gate_metric_is_one_thresholds_can_be_tuned_for():
    from protein.config import THRESHOLD_METRICS, GateConfig

    for metric in THRESHOLD_METRICS:
        assert GateConfig(metric=metric).metric == metric
    with pytest.raises(ValueError, match="metric must be one of f1_samples, .* got 'accuracy'"):
        GateConfig(metric="accuracy")
