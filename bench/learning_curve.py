"""Learning curve on synthetic data: samples-F1 on the hidden test labels for the default
recipe and the winner recipe (protein.config.RECIPES) at three training-set sizes, side by side
with the predict-the-prior baseline, and a plain verdict where a recipe fails to beat the prior.

Both recipes run at the bench's resolution and epochs (their other settings, e.g. the winner's
efficientnet_b1, jitter, EMA and TTA, are their own). The winner starts from ImageNet weights
when torchvision's file is in $TORCH_HOME (never downloaded); otherwise it trains from scratch,
and the result says so: from scratch, an EfficientNet on a few hundred images is expected to
score below the prior (efficientnet_b0 measured 0.250 vs the prior's 0.348 at 400 images).

Smaller training sets are prefixes of one seeded permutation, so each size contains the one
before it; every recipe at a size trains on exactly the same rows and is scored on the same
hidden test rows. The dataset is made once under the bench data dir and reused.

    PYTHONPATH=. python -m bench.learning_curve                  # 3 sizes x 2 recipes, tens of minutes on CPU
    PYTHONPATH=. python -m bench.learning_curve --sizes 20 30 40 --test 20 --epochs 1 --image-size 32 --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import data_dir, format_table, machine_info, publish

RECIPES = ("default", "winner")
METRICS = ("f1_samples", "f1_macro", "course_f_score")


def dataset(n_train: int, n_test: int, size: int, seed: int) -> tuple[Path, Path]:
    """A synthetic dataset with its hidden test labels, made once and reused while complete."""
    from protein.config import SynthConfig
    from protein.synth import generate_dataset

    name = f"learning-curve-{n_train}-{n_test}-{size}px-seed{seed}"
    out, truth = data_dir() / name, data_dir() / f"{name}-test-labels.csv"
    if (out / "train.csv").is_file() and truth.is_file():
        return out, truth
    config = SynthConfig(train=n_train, test=n_test, size=size, seed=seed, label_noise=0.03, workers=2)
    generate_dataset(config, out, truth)
    return out, truth


def batch_size_for(n_rows: int, preferred: int) -> int:
    # A last batch of one image breaks BatchNorm in training: move to a size that avoids it.
    size = preferred
    while n_rows % size == 1:
        size += 1
    return size


def run(sizes: list[int], recipes: list[str], n_test: int, image_size: int, epochs: int, synth_size: int,
        seed: int) -> dict[str, Any]:
    import torch

    from protein.config import recipe_config
    from protein.data import fingerprint, load_competition
    from protein.evaluation.metrics import evaluate_predictions, prior_baseline
    from protein.evaluation.scoring import read_label_csv
    from protein.modeling.model import IMAGENET, imagenet_weights
    from protein.modeling.presets import EvalPreset
    from protein.modeling.train import fit, predict_probs, select_device
    from protein.pipeline import load_split_images
    from protein.split import iterative_stratified_split
    from protein.storage import open_store

    def weights_for(recipe: str) -> str:
        """The recipe's own initialisation when its file is here; else from scratch ("")."""
        wanted = recipe_config(recipe).weights
        if wanted == IMAGENET and not imagenet_weights(recipe_config(recipe).arch).path.is_file():
            return ""
        return wanted or ""

    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    path, truth = dataset(max(sizes), n_test, synth_size, seed)
    data = load_competition(path, require_test=True)
    digest = fingerprint(data.source)
    with tempfile.TemporaryDirectory(prefix="learning-curve-") as tmp:
        cache = Path(tmp) / "cache"
        train_images = load_split_images(data, "train", image_size, digest, cache)
        test_images = load_split_images(data, "test", image_size, digest, cache)
        truth_ids, truth_targets = read_label_csv(truth)
        order = {image_id: i for i, image_id in enumerate(truth_ids)}
        test_targets = truth_targets[[order[i] for i in data.test_ids]].astype(bool)
        targets = data.targets
        permutation = np.random.default_rng(seed).permutation(len(data.train_ids))
        device = select_device("auto")
        store = open_store(str(Path(tmp) / "store"))
        rows: list[dict[str, Any]] = []
        for n in sizes:
            subset = np.sort(permutation[:n])
            train_part, holdout_part = iterative_stratified_split(targets[subset], 0.2, seed)
            train_idx, holdout_idx = subset[train_part], subset[holdout_part]
            prior = evaluate_predictions(prior_baseline(targets[train_idx], len(test_targets)), test_targets, 0.5)
            rows.append({"train_images": n, "recipe": "prior baseline", "arch": "-", "init": "-",
                         **{m: prior[m] for m in METRICS},
                         "train_s": 0.0})
            for recipe in recipes:
                config = recipe_config(recipe, image_size=image_size, epochs=epochs, seed=seed,
                                       batch_size=batch_size_for(len(train_idx), 32), weights=weights_for(recipe))
                started = time.perf_counter()
                result = fit(config, train_images, targets, train_idx, holdout_idx, store, f"lc-{recipe}-{n}")
                seconds = time.perf_counter() - started
                probs = predict_probs(result.model, test_images, EvalPreset(), device, 64, tta=config.tta)
                scores = evaluate_predictions(probs, test_targets, result.thresholds)
                rows.append({"train_images": n, "recipe": recipe, "arch": config.arch,
                             "init": "imagenet" if config.weights else "from scratch",
                             **{m: scores[m] for m in METRICS}, "train_s": seconds,
                             "beats_prior": scores["f1_samples"] > prior["f1_samples"]})
                logging.getLogger(__name__).info("%s on %d images: %s", recipe, n, rows[-1])
    return {"benchmark": "learning_curve", "device": str(device), "torch_threads": torch.get_num_threads(),
            "settings": {"sizes": sizes, "recipes": {r: dataclasses.asdict(recipe_config(r)) for r in recipes},
                         "test_images": n_test, "image_size": image_size, "epochs": epochs,
                         "synth_size": synth_size, "seed": seed, "label_noise": 0.03, "holdout_fraction": 0.2},
            "machine": machine_info(), "results": rows, "verdicts": verdicts(rows)}


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """One plain sentence per recipe and size: does it beat predicting the prior?"""
    prior = {r["train_images"]: r["f1_samples"] for r in rows if r["recipe"] == "prior baseline"}
    lines = []
    for r in rows:
        if r["recipe"] == "prior baseline":
            continue
        floor = prior[r["train_images"]]
        what = f"{r['recipe']} ({r['arch']}, {r['init']}) on {r['train_images']} images: samples-F1 " \
               f"{r['f1_samples']:.3f} vs the prior's {floor:.3f}"
        lines.append(f"{what}: beats the prior" if r["beats_prior"] else
                     f"{what}: FAILS, no better than predicting the label frequencies")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400], help="training-set sizes")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES)
    parser.add_argument("--test", type=int, default=200, help="hidden test images scored")
    parser.add_argument("--image-size", type=int, default=64, help="training resolution")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--synth-size", type=int, default=256, help="resolution the synthetic PNGs are written at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: OpenMP spinning on a loaded machine costs more than it gives)")
    parser.add_argument("--quick", action="store_true", help="write learning_curve.quick.json (never the full result)")
    parser.add_argument("--out", type=Path, help="write the JSON here instead of bench/results/")
    args = parser.parse_args(argv)
    if min(args.sizes) < 10:
        parser.error("every size must be at least 10 images")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    torch.set_num_threads(args.threads)
    result = run(sorted(args.sizes), args.recipes, args.test, args.image_size, args.epochs, args.synth_size,
                 args.seed)
    table = format_table(result["results"], ["train_images", "recipe", "init", *METRICS, "train_s"])
    table += "\n" + "\n".join(result["verdicts"])
    publish("learning_curve", result, table, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
