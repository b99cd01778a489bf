"""What one epoch of the winner recipe costs: EfficientNet-B1 (or --arch) at 512 px.

A few measured training steps with the recipe's own pieces (TrainPreset with dihedral and
brightness/contrast jitter, forward, BCE, backward, AdamW + one-cycle with no decay on norms and
biases, EMA update) and a few 8-view TTA inference steps, on random uint8 images; then
extrapolated to the real training set (19,236 images: 80 % trained on, 20 % held out and scored
with TTA). The extrapolation is arithmetic on measured medians, marked as such in the output.

    python -m bench.winner_epoch [--device cpu|cuda] [--batch-size B] [--steps N] [--arch A] [--size PX]
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import format_table, machine_info, median, publish
from protein.config import recipe_config
from protein.labels import NUM_CLASSES
from protein.modeling.ema import make_ema
from protein.modeling.model import build_model
from protein.modeling.optimization import build_optimizer, make_loss
from protein.modeling.presets import EvalPreset, TrainPreset
from protein.modeling.scaling import ema_decay_per_step
from protein.modeling.train import predict_probs, select_device, train_one_epoch

log = logging.getLogger(__name__)

NAME = "winner_epoch"
REAL_TRAIN_IMAGES = 19_236  # rows of the competition's train.csv
HOLDOUT_FRACTION = 0.2


def measure(arch: str, size: int, batch_size: int, steps: int, device: torch.device) -> dict[str, Any]:
    config = recipe_config("winner", arch=arch, image_size=size, batch_size=batch_size, weights="none",
                           device=device.type)
    torch.manual_seed(0)
    model = build_model(arch, NUM_CLASSES, image_size=size).to(device)
    channels_last = device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = make_ema(model, ema_decay_per_step(config.ema_half_life_epochs, steps + 1))
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch=steps + 1)
    loss_fn = make_loss(config)
    preset = TrainPreset(channels_last=channels_last, jitter=config.jitter)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8)
    targets = (rng.random((batch_size, NUM_CLASSES)) < 0.2).astype(np.float32)
    batch = (torch.from_numpy(images), torch.from_numpy(targets))
    generator = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    train_s: list[float] = []
    train_cpu_s: list[float] = []
    for step in range(steps + 1):  # the first step warms up (allocator, kernels)
        sync()
        started, cpu_started = time.perf_counter(), time.process_time()
        train_one_epoch(model, iter([batch]), optimizer, scheduler, loss_fn, preset, device, generator, ema=ema)
        sync()
        log.info("train step %d: %.1f s", step, time.perf_counter() - started)
        if step:
            train_s.append(time.perf_counter() - started)
            train_cpu_s.append(time.process_time() - cpu_started)
    tta_s: list[float] = []
    eval_preset = EvalPreset(channels_last=channels_last)
    for step in range(2):
        sync()
        started = time.perf_counter()
        predict_probs(ema.module, images, eval_preset, device, batch_size, tta=True)
        sync()
        log.info("TTA step %d: %.1f s", step, time.perf_counter() - started)
        if step:
            tta_s.append(time.perf_counter() - started)
    train_per_image = median(train_s) / batch_size
    tta_per_image = median(tta_s) / batch_size
    n_train = round(REAL_TRAIN_IMAGES * (1 - HOLDOUT_FRACTION))
    n_holdout = REAL_TRAIN_IMAGES - n_train
    # Per epoch: train on n_train, score the holdout once without TTA (1/8 of a TTA pass).
    epoch_s = n_train * train_per_image + n_holdout * tta_per_image / 8
    return {
        "arch": arch, "image_size": size, "batch_size": batch_size, "steps": steps,
        "train_images_per_s": 1 / train_per_image, "tta_images_per_s": 1 / tta_per_image,
        "train_step_s": train_s, "tta_step_s": tta_s,
        # CPU seconds the process used per step (all threads): on a busy shared machine wall time
        # mostly measures the other tenants; this is what the step itself costs.
        "train_step_cpu_s": train_cpu_s, "train_cpu_s_per_image": median(train_cpu_s) / batch_size,
        "extrapolated": {
            "note": "arithmetic on the measured medians, not a measured epoch",
            "train_images": n_train, "holdout_images": n_holdout,
            "epoch_s": epoch_s, "final_tta_holdout_s": n_holdout * tta_per_image,
            "recipe_epochs": config.epochs, "recipe_total_h": (config.epochs * epoch_s
                                                               + n_holdout * tta_per_image) / 3600,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.winner_epoch", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="efficientnet_b1")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = select_device(args.device)
    r = measure(args.arch, args.size, args.batch_size, args.steps, device)
    result = {"benchmark": NAME, "device": str(device), "quick": False, "results": [r], "machine": machine_info(),
              "load_average": os.getloadavg()}
    e = r["extrapolated"]
    text = "\n".join([
        f"{r['arch']} at {r['image_size']} px on {device} ({result['machine']['torch_threads']} torch threads, "
        f"load average {result['load_average'][0]:.1f}); medians of {r['steps']} steps after one warm-up",
        format_table([{"train img/s": r["train_images_per_s"], "TTA img/s": r["tta_images_per_s"],
                       "epoch min (extrapolated)": e["epoch_s"] / 60,
                       "26 epochs h (extrapolated)": e["recipe_total_h"]}],
                     ["train img/s", "TTA img/s", "epoch min (extrapolated)", "26 epochs h (extrapolated)"]),
    ])
    publish(NAME, result, text, args.out, False)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
