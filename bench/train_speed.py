"""CPU training and inference images/s for resnet18 at 128 and 256 px.

Each training step is the library's own: `train_one_epoch` over one uint8 batch (TrainPreset,
forward, loss, backward, AdamW + OneCycle step); inference is `predict_probs` (EvalPreset,
forward, sigmoid). Random images: only the arithmetic is measured here, the data path is
bench.data_path's. Medians of per-step times after warm-up.

    python -m bench.train_speed [--quick] [--sizes 128 256] [--steps 4]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import format_table, machine_info, median, publish
from protein.config import TrainConfig
from protein.labels import NUM_CLASSES
from protein.modeling.model import build_model
from protein.modeling.optimization import build_optimizer, make_loss
from protein.modeling.presets import EvalPreset, TrainPreset
from protein.modeling.train import predict_probs, select_device, train_one_epoch

log = logging.getLogger(__name__)

NAME = "train_speed"
ARCH = "resnet18"
# Batch per size: large enough to be a real step, small enough to keep the run bounded on 2 cores.
BATCH_SIZES = {128: 32, 256: 16}
INFER_WARMUP = 2
INFER_STEPS_PER_TRAIN_STEP = 2


def measure(arch: str, image_size: int, batch_size: int, steps: int, warmup: int,
            device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    config = TrainConfig(arch=arch, image_size=image_size, batch_size=batch_size, device=device.type)
    model = build_model(arch, NUM_CLASSES).to(device)
    optimizer, scheduler = build_optimizer(model, config, steps_per_epoch=warmup + steps)
    loss_fn = make_loss(config)
    preset, eval_preset = TrainPreset(), EvalPreset()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
    targets = (rng.random((batch_size, NUM_CLASSES)) < 0.2).astype(np.float32)
    batch = (torch.from_numpy(images), torch.from_numpy(targets))
    generator = torch.Generator().manual_seed(0)

    train_s: list[float] = []
    for step in range(warmup + steps):
        started = time.perf_counter()
        train_one_epoch(model, iter([batch]), optimizer, scheduler, loss_fn, preset, device, generator)
        if step >= warmup:
            train_s.append(time.perf_counter() - started)
    infer_s: list[float] = []
    # Inference steps are cheap, and the first few after training are slow (allocator, oneDNN
    # primitives for eval mode): more of both keeps the median honest on a busy machine.
    for step in range(INFER_WARMUP + INFER_STEPS_PER_TRAIN_STEP * steps):
        started = time.perf_counter()
        predict_probs(model, images, eval_preset, device, batch_size)
        if step >= INFER_WARMUP:
            infer_s.append(time.perf_counter() - started)
    return {
        "arch": arch,
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "infer_steps": len(infer_s),
        "infer_warmup": INFER_WARMUP,
        "train_images_per_s": batch_size / median(train_s),
        "infer_images_per_s": batch_size / median(infer_s),
        "train_step_s": train_s,
        "infer_step_s": infer_s,
    }


def table(result: dict[str, Any]) -> str:
    rows = [{"arch": r["arch"], "px": r["image_size"], "batch": r["batch_size"],
             "train img/s": r["train_images_per_s"], "infer img/s": r["infer_images_per_s"],
             "train step s": median(r["train_step_s"])} for r in result["results"]]
    header = (f"{result['device']} speed, medians of {result['results'][0]['steps']} train / "
              f"{result['results'][0]['infer_steps']} infer steps after warm-up, "
              f"{result['machine']['torch_threads']} torch threads")
    return "\n".join([header, format_table(rows, ["arch", "px", "batch", "train img/s", "infer img/s",
                                                  "train step s"])])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 px, batch 4, 2 steps: a smoke run")
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(BATCH_SIZES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if args.quick:
        plan = [(64, 4)]
        steps = args.steps or 2
    else:
        plan = [(size, BATCH_SIZES.get(size, 16)) for size in args.sizes]
        steps = args.steps or 4
    results = [measure(ARCH, size, batch, steps, 1, device) for size, batch in plan]
    result = {"benchmark": NAME, "device": str(device), "quick": args.quick, "results": results,
              "machine": machine_info()}
    for r in results:  # flat keys for the summary table and quick lookups
        result[f"train_images_per_s_{r['image_size']}"] = r["train_images_per_s"]
        result[f"infer_images_per_s_{r['image_size']}"] = r["infer_images_per_s"]
    publish(NAME, result, table(result), args.out, args.quick)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
