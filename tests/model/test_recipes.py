"""The winner recipe end to end at a tiny size (ImageNet weights from a temporary TORCH_HOME, EMA,
jitter, TTA, tuned thresholds), K-fold models, their out-of-fold thresholds, an ensemble
prediction and a refit on every row."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from protein.cli import main
from protein.config import TrainConfig, recipe_config
from protein.data import fingerprint, load_competition
from protein.errors import ProteinError
from protein.evaluation.metrics import binarize
from protein.modeling.model import imagenet_weights
from protein.pipeline import (
    evaluate_version,
    load_predictor,
    load_split_images,
    predict_and_publish,
)
from protein.registry import Registry
from protein.storage import open_store
from tests.helpers import module_scratch


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    return tmp_path / "torch-home"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict | None, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    return code, json.loads(lines[-1]) if lines else None, err


def test_winner_recipe_end_to_end_at_a_tiny_size(tiny_dataset, torch_home, tmp_path, capsys):
    weights = imagenet_weights("efficientnet_b1")
    weights.path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.efficientnet_b1(weights=None).state_dict(), weights.path)
    store, cache = str(tmp_path / "store"), tmp_path / "cache"

    code, result, err = run_cli(["train", "--data", str(tiny_dataset), "--store", store, "--cache-dir", str(cache),
                                 "--recipe", "winner", "--image-size", "32", "--epochs", "1", "--batch-size", "16"],
                                capsys)
    assert code == 0, err
    registry = Registry(open_store(store))
    spec = registry.spec(result["model_id"])
    assert spec["recipe"] == "winner" and spec["arch"] == "efficientnet_b1" and spec["tta"] is True
    assert spec["weights_init"] == {"source": "imagenet", "enum": "EfficientNet_B1_Weights.IMAGENET1K_V2",
                                    "file": "efficientnet_b1-c27df63c.pth", "url": weights.url}
    # 32 training rows at batch 16: 2 steps an epoch, so a 1.5-epoch half-life is 0.5 ** (1 / 3) per step.
    assert spec["ema"]["half_life_epochs"] == 1.5 and spec["ema"]["decay_per_step"] == pytest.approx(0.5 ** (1 / 3))
    assert spec["train_config"]["jitter"] == 0.2 and spec["training"]["lr_rule"]["scaling"] == "sqrt"
    assert spec["training"]["peak_lr"] == pytest.approx(1e-3 * (16 / 32) ** 0.5)
    tuning = spec["metrics"]["thresholds_tuning"]
    assert tuning["metric"] == "f1_samples" and tuning["cross_fitted"] is True
    assert spec["metrics"]["thresholds"] == spec["thresholds"] and len(spec["thresholds"]) == 10

    # What is saved is the moving average, not the last step's weights.
    from safetensors.torch import load_file

    raw = open_store(store).get_bytes(f"runs/{result['run_id']}/checkpoint.pt")
    checkpoint = torch.load(io.BytesIO(raw), weights_only=True)
    local = registry.download(result["model_id"], tmp_path / "dl")
    saved = load_file(str(local / "model.safetensors"))
    assert all(torch.equal(saved[k], checkpoint["ema"][f"module.{k}"]) for k in saved)
    assert not all(torch.equal(saved[k], checkpoint["model"][k]) for k in saved if k.endswith("weight"))

    predictor = load_predictor(registry, result["model_id"], tmp_path / "dl2")
    assert predictor.tta
    evaluation = evaluate_version(tiny_dataset, store, result["model_id"], cache_dir=cache)
    assert evaluation["n_images"] == spec["holdout"]["n_holdout"] == 8
    code, published, err = run_cli(["predict", "--data", str(tiny_dataset), "--store", store, "--cache-dir",
                                    str(cache), "--model", result["model_id"], "--out", str(tmp_path / "sub.csv")],
                                   capsys)
    assert code == 0, err
    submission = pd.read_csv(tmp_path / "sub.csv", dtype=str)
    assert len(submission) == 12 and submission["Label"].str.len().min() > 0  # never empty


def test_missing_imagenet_weights_is_one_line_exit_2(tiny_dataset, torch_home, tmp_path, capsys):
    code, _, err = run_cli(["train", "--data", str(tiny_dataset), "--store", str(tmp_path / "store"),
                            "--cache-dir", str(tmp_path / "cache"), "--arch", "resnet18", "--weights", "imagenet",
                            "--image-size", "32", "--epochs", "1"], capsys)
    assert code == 2
    line = [x for x in err.splitlines() if "error" in x]
    assert len(line) == 1 and "resnet18-f37072fd.pth" in line[0] and str(torch_home) in line[0]
    assert "Traceback" not in err


FOLD = TrainConfig(image_size=32, epochs=1, batch_size=16, seed=0, folds=2)


@pytest.fixture(scope="module")
def folds(tiny_dataset, tmp_path_factory, trainer):
    with module_scratch(tmp_path_factory, "folds") as root:
        store, cache = str(root / "store"), root / "cache"
        ids = []
        for fold in (1, 2):
            config = recipe_config(**{**FOLD.__dict__, "fold": fold, "tta": True, "recipe": "default"})
            ids.append(trainer(tiny_dataset, store, config, cache_dir=cache)["model_id"])
        yield {"store": store, "cache": cache, "ids": ids, "root": root}


def test_fold_models_hold_out_disjoint_parts_covering_every_row(folds, tiny_dataset):
    registry = Registry(open_store(folds["store"]))
    specs = [registry.spec(m) for m in folds["ids"]]
    assert [s["holdout"]["fold"] for s in specs] == [1, 2]
    assert sum(s["holdout"]["n_holdout"] for s in specs) == 40
    from protein.modeling.ensemble import load_holdout_probs

    held = [set(load_holdout_probs(registry.store, s["holdout"]["probs_key"])[0]) for s in specs]
    assert not held[0] & held[1] and held[0] | held[1] == set(load_competition(tiny_dataset).train_ids)
    evaluation = evaluate_version(tiny_dataset, folds["store"], folds["ids"][1], cache_dir=folds["cache"])
    assert set(evaluation["rows"]["ids"]) == held[1]  # a fold model is scored on its own fold


def test_ensemble_predicts_the_mean_tta_probabilities_with_out_of_fold_thresholds(folds, tiny_dataset, tmp_path,
                                                                                  capsys):
    out = tmp_path / "ensemble.csv"
    code, pointer, err = run_cli(["predict", "--data", str(tiny_dataset), "--store", folds["store"], "--cache-dir",
                                  str(folds["cache"]), "--model", *folds["ids"], "--out", str(out)], capsys)
    assert code == 0, err
    assert pointer["model_id"].startswith("ensemble-") and pointer["members"] == folds["ids"]
    source = pointer["thresholds_from"]
    assert source["source"] == "out-of-fold" and source["complete"] and source["n_rows"] == 40

    registry = Registry(open_store(folds["store"]))
    data = load_competition(tiny_dataset)
    probs = []
    for member in folds["ids"]:
        predictor = load_predictor(registry, member, tmp_path / "dl")
        assert predictor.tta
        images = load_split_images(data, "test", predictor.image_size, fingerprint(data.source), folds["cache"])
        probs.append(predictor.predict_probs(images))
    mean = np.mean(probs, axis=0)
    expected = binarize(mean, np.asarray(pointer["thresholds"], dtype=np.float32))
    from protein.labels import format_label_set

    submission = pd.read_csv(out, dtype=str)
    assert submission["Label"].tolist() == [format_label_set(np.flatnonzero(r)) for r in expected]
    assert submission["Image"].tolist() == data.test_ids


def test_refit_on_every_row_records_out_of_fold_thresholds(folds, tiny_dataset, tmp_path, trainer):
    config = recipe_config(**{**FOLD.__dict__, "refit": True, "thresholds_from": tuple(folds["ids"]),
                              "tta": True, "recipe": "default"})  # the folds' settings: a refit refuses others
    result = trainer(tiny_dataset, folds["store"], config, cache_dir=folds["cache"])
    spec = Registry(open_store(folds["store"])).spec(result["model_id"])
    assert spec["holdout"]["n_train"] == 40 and spec["holdout"]["n_holdout"] == 0
    assert spec["refit"]["trained_on"] == "all rows" and spec["refit"]["models"] == folds["ids"]
    assert spec["refit"]["source"] == "out-of-fold" and spec["refit"]["n_rows"] == 40
    assert spec["metrics"]["thresholds_tuning"]["cross_fitted"] is True
    assert spec["thresholds"] == spec["metrics"]["thresholds"]


def test_a_refit_on_other_data_than_its_folds_is_refused_before_training(folds, tiny_dataset, tmp_path):
    import shutil

    from protein.errors import DataError
    from protein.pipeline import train_and_register

    # The same ids relabelled: tuning would pair the folds' probabilities with labels they never saw.
    relabelled = tmp_path / "relabelled"
    shutil.copytree(tiny_dataset, relabelled)
    lines = (relabelled / "train.csv").read_text().splitlines()
    (relabelled / "train.csv").write_text("\n".join([lines[0], *(f"{line.split(',')[0]},9" for line in lines[1:])])
                                          + "\n")
    versions = set(Registry(open_store(folds["store"])).versions())
    config = recipe_config(**{**FOLD.__dict__, "refit": True, "thresholds_from": tuple(folds["ids"]),
                              "tta": True, "recipe": "default"})  # the folds' settings: a refit refuses others
    with pytest.raises(DataError, match=r"data fingerprint \w+, but the fold models .* were trained on \w+"):
        train_and_register(relabelled, folds["store"], config, cache_dir=tmp_path / "cache")
    assert set(Registry(open_store(folds["store"])).versions()) == versions


def test_an_ensemble_of_non_fold_models_uses_the_mean_of_their_thresholds(folds, trained, tiny_dataset):
    registry = Registry(open_store(folds["store"]))
    registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    pointer = predict_and_publish(tiny_dataset, folds["store"], [folds["ids"][0], trained["model_id"]],
                                  cache_dir=folds["cache"])
    assert pointer["thresholds_from"]["source"].startswith("mean of the members' thresholds")
    expected = np.mean([registry.spec(folds["ids"][0])["thresholds"], registry.spec(trained["model_id"])["thresholds"]],
                       axis=0)
    assert np.allclose(pointer["thresholds"], expected, atol=1e-6)
    with pytest.raises(ProteinError, match=f"name version {folds['ids'][0]} twice"):
        predict_and_publish(tiny_dataset, folds["store"], [folds["ids"][0], folds["ids"][0]], cache_dir=folds["cache"])
