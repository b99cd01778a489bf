"""Learning curve on synthetic data: samples-F1 on the hidden test labels for several
training-set sizes and recipes, side by side with the predict-the-prior baseline.

Smaller training sets are prefixes of one seeded permutation, so each size contains the one
before it; every recipe at a size trains on exactly the same rows and is scored on the same
hidden test rows. The dataset is made once under the bench data dir and reused.

    PYTHONPATH=. python -m bench.learning_curve                  # 3 sizes x 2 recipes, a few minutes on CPU
    PYTHONPATH=. python -m bench.learning_curve --recipes resnet18 --sizes 50 100 --quick
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

# Recipes by name: what differs from the bench's shared TrainConfig. A recipe another module
# defines (e.g. a `winner` preset) can be added here once it exists.
RECIPES: dict[str, dict[str, Any]] = {
    "resnet18": {"arch": "resnet18"},
    "efficientnet_b0": {"arch": "efficientnet_b0"},
}
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

    from protein.config import TrainConfig
    from protein.data import fingerprint, load_competition
    from protein.evaluation.metrics import evaluate_predictions, prior_baseline
    from protein.evaluation.scoring import read_label_csv
    from protein.modeling.presets import EvalPreset
    from protein.modeling.train import fit, predict_probs, select_device
    from protein.pipeline import load_split_images
    from protein.split import iterative_stratified_split
    from protein.storage import open_store

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
            rows.append({"train_images": n, "recipe": "prior baseline", **{m: prior[m] for m in METRICS},
                         "train_s": 0.0})
            for recipe in recipes:
                config = TrainConfig(image_size=image_size, epochs=epochs, seed=seed,
                                     batch_size=batch_size_for(len(train_idx), 32), **RECIPES[recipe])
                started = time.perf_counter()
                result = fit(config, train_images, targets, train_idx, holdout_idx, store, f"lc-{recipe}-{n}")
                seconds = time.perf_counter() - started
                probs = predict_probs(result.model, test_images, EvalPreset(), device, 64)
                scores = evaluate_predictions(probs, test_targets, result.thresholds)
                rows.append({"train_images": n, "recipe": recipe, **{m: scores[m] for m in METRICS},
                             "train_s": seconds})
                logging.getLogger(__name__).info("%s on %d images: %s", recipe, n, rows[-1])
    return {"benchmark": "learning_curve", "device": str(device), "torch_threads": torch.get_num_threads(),
            "settings": {"sizes": sizes, "recipes": {r: RECIPES[r] for r in recipes}, "test_images": n_test,
                         "image_size": image_size, "epochs": epochs, "synth_size": synth_size, "seed": seed,
                         "label_noise": 0.03, "holdout_fraction": 0.2,
                         "shared_train_config": dataclasses.asdict(TrainConfig())},
            "machine": machine_info(), "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.learning_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400], help="training-set sizes")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help=f"any of {', '.join(RECIPES)}")
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
    table = format_table(result["results"], ["train_images", "recipe", *METRICS, "train_s"])
    publish("learning_curve", result, table, args.out, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
