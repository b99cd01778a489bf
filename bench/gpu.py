"""Training and inference images/s on a CUDA GPU, timed through `fit`'s own code path.

For each recipe (winner: efficientnet_b1 at 512 px, global batch 32, brightness/contrast jitter,
EMA, 8-view TTA; default: resnet18 at 128 px, batch 32), the run is set up by the functions
`protein.modeling.train.fit` calls, not a copy of them (MLPerf's rule: a benchmark times the code
path of the result it speaks for): `build_training` (cudnn.benchmark, bf16 autocast,
channels_last, the EMA on the device, the scaled learning rate), then
  model-only  `train_step` on one batch already on the GPU: the step's own ceiling, no data path
  fit         `epoch_batches` (the decode-once cache, pinned memory, the prefetch thread) into
              `Training.train_epoch` (train_one_epoch -> train_step), exactly as fit runs an epoch
and fit's ratio to the ceiling. Each figure is timed over 3 windows (cuda synchronize around
each; warm-up excluded) and reported as the median with the spread (min-max) of the 3. Also:
inference images/s through `predict_probs` with the recipe's TTA (8 views for the winner), and
peak GPU memory. It prints the card, driver, CUDA and torch it ran on, and writes JSON with them
and the commit it ran at (`commit`: `-dirty` with uncommitted changes).

    python -m bench.gpu [--device cuda|cpu] [--quick] [--recipes winner default] [--out FILE]
    make bench-gpu

`--device cpu --quick` runs the same functions at toy sizes (a smoke check on any machine).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import REPO, bench_dataset, data_dir, format_table, git_head, machine_info, median, publish
from protein.cache import ImageCache, default_workers
from protein.config import TrainConfig, recipe_config
from protein.data import load_competition
from protein.labels import NUM_CLASSES
from protein.modeling import train as fit_path  # called through the module: the test spies on it
from protein.modeling.scaling import steps_per_epoch

log = logging.getLogger(__name__)

NAME = "gpu"
WINDOWS = 3


@dataclass(frozen=True)
class Plan:
    recipes: tuple[str, ...]
    # Per recipe: (image size, global batch). Full: the recipes' own values.
    sizes: dict[str, tuple[int, int]]
    n_images: int  # rows in the decoded cache; one fit window is one epoch over them
    ceiling_steps: int  # steps per model-only window
    infer_images: int


def make_plan(quick: bool, recipes: tuple[str, ...]) -> Plan:
    if quick:
        return Plan(recipes, {r: (32, 8) for r in recipes}, n_images=16, ceiling_steps=2, infer_images=4)
    sizes = {r: (recipe_config(r).image_size, recipe_config(r).batch_size) for r in recipes}
    # 1,024 rows: 32 steps per fit window at batch 32, ~0.8 GB of decoded 512 px images.
    return Plan(recipes, sizes, n_images=1024, ceiling_steps=32, infer_images=512)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work: Callable[[], Any]) -> float:
    sync(device)
    started = time.perf_counter()
    work()
    sync(device)
    return time.perf_counter() - started


def spread(images: int, seconds: list[float]) -> dict[str, Any]:
    rates = sorted(images / s for s in seconds)
    return {"images_per_s": median(rates), "images_per_s_min": rates[0], "images_per_s_max": rates[-1],
            "spread": (rates[-1] - rates[0]) / median(rates), "window_seconds": seconds, "window_images": images}


def bench_config(recipe: str, size: int, batch: int, device: torch.device) -> TrainConfig:
    # Random initialisation: the ImageNet file changes the numbers, not the speed.
    return recipe_config(recipe, image_size=size, batch_size=batch, weights="none", device=device.type,
                         min_batch_per_rank=1, epochs=100)  # a schedule longer than the bench: it never runs out


def measure_recipe(recipe: str, plan: Plan, device: torch.device, images: np.ndarray,
                   targets: np.ndarray) -> list[dict[str, Any]]:
    size, batch = plan.sizes[recipe]
    config = bench_config(recipe, size, batch, device)
    train_idx = np.arange(len(images))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    training = fit_path.build_training(config, device, len(train_idx))
    base = {"recipe": recipe, "arch": config.arch, "image_size": size, "batch_size": batch, "compile": config.compile,
            "jitter": config.jitter, "ema": training.ema is not None, "tta": config.tta}

    # Ceiling: the same step on a batch already on the device; its first steps pay for cuDNN autotuning.
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)).to(device)
    y = torch.from_numpy((rng.random((batch, NUM_CLASSES)) < 0.2).astype(np.float32)).to(device)
    host = torch.Generator().manual_seed(0)
    on_device = torch.Generator(device=device).manual_seed(0)

    def steps(n: int) -> None:
        training.step_model.train()
        for _ in range(n):
            fit_path.train_step(training.step_model, x, y, training.optimizer, training.scheduler, training.loss_fn,
                                training.train_preset, device, host, training.ema, config.accumulate, on_device)

    warmup_s = timed(device, lambda: steps(3))
    ceiling = spread(plan.ceiling_steps * batch, [timed(device, lambda: steps(plan.ceiling_steps))
                                                 for _ in range(WINDOWS)])

    # Fit: one epoch per window, as fit runs it (epoch 0 is the warm-up).
    def epoch(index: int) -> None:
        batches, generators = fit_path.epoch_batches(config, images, targets, train_idx, index, device)
        with contextlib.closing(batches):  # as fit does: an error ends the prefetch thread too
            stats = training.train_epoch(config, batches, device, generators)
        if not np.isfinite(stats["train_loss"]):
            raise RuntimeError(f"{recipe}: training loss is not finite")

    timed(device, lambda: epoch(0))
    n_fit = steps_per_epoch(len(train_idx), batch) * batch
    fitted = spread(n_fit, [timed(device, lambda i=i: epoch(i)) for i in range(1, WINDOWS + 1)])

    # Inference as evaluation and prediction run it: the shipped weights, the recipe's TTA.
    model = training.ema.module if training.ema is not None else training.model
    index = np.arange(min(plan.infer_images, len(images)))

    def infer() -> None:
        fit_path.predict_probs(model, images, training.eval_preset, device, 2 * batch, index, tta=config.tta)

    infer()
    inference = spread(len(index), [timed(device, infer) for _ in range(WINDOWS)])
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    rows = [{**base, "loader": "model-only", **ceiling, "warmup_s": warmup_s},
            {**base, "loader": "fit", **fitted}]
    for row in rows:
        row["ratio_to_ceiling"] = row["images_per_s"] / ceiling["images_per_s"]
        row["inference_images_per_s"] = inference["images_per_s"]
        row["inference_spread"] = inference["spread"]
        row["peak_gpu_memory_mib"] = peak
        row["layout"] = training.layout
    return rows


def card(device: torch.device) -> dict[str, Any]:
    """The card, driver, CUDA and torch a result was measured on."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if device.type != "cuda":
        info["name"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        return info
    props = torch.cuda.get_device_properties(device)
    info.update({"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                 "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count()})
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)
        info["driver"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        info["driver"] = "unknown (nvidia-smi unavailable)"
    return info


def commit() -> str | None:
    """The commit the run measured (``-dirty`` with uncommitted changes), or None where this copy of
    the tree has no git history: a GPU run's figures are worth keeping without their label."""
    try:
        return git_head(REPO)
    except (OSError, subprocess.CalledProcessError):
        log.warning("no git commit for %s: the result's commit is null", REPO)
        return None


def run(plan: Plan, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    data = load_competition(bench_dataset(plan.n_images, max(s for s, _ in plan.sizes.values())))
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    cache_build_s: dict[str, float] = {}
    data_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir()) as tmp:
        for recipe in plan.recipes:
            size = plan.sizes[recipe][0]
            t0 = time.perf_counter()
            images = ImageCache(Path(tmp)).build(data, "train", size, workers=default_workers())
            cache_build_s[f"{recipe} {size}px"] = time.perf_counter() - t0
            log.info("measuring %s", recipe)
            try:
                results += measure_recipe(recipe, plan, device, images, data.targets)
            except Exception as exc:  # one failing recipe must not lose the other's numbers
                log.exception("%s failed", recipe)
                errors.append(f"{recipe}: {type(exc).__name__}: {exc}")
            del images
            if device.type == "cuda":  # the next recipe starts from an empty allocator
                torch.cuda.empty_cache()
    return {"benchmark": NAME, "commit": commit(), "device": str(device), "card": card(device),
            "device_name": card(device)["name"],
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "windows": WINDOWS,
            "plan": asdict(plan), "cache_build_s": cache_build_s, "results": results, "errors": errors,
            "wall_s": time.perf_counter() - started, "machine": machine_info()}


def table(result: dict[str, Any]) -> str:
    rows = [{"recipe": r["recipe"], "arch": r["arch"], "px": r["image_size"], "batch": r["batch_size"],
             "path": r["loader"], "img/s": r["images_per_s"],
             "3 windows": f"{r['images_per_s_min']:.1f}-{r['images_per_s_max']:.1f}",
             "of ceiling": f"{r['ratio_to_ceiling']:.0%}", "infer img/s (TTA)": r["inference_images_per_s"],
             "peak MiB": "-" if r["peak_gpu_memory_mib"] is None else f"{r['peak_gpu_memory_mib']:.0f}"}
            for r in result["results"]]
    c = result["card"]
    lines = [f"{c['name']}, driver {c.get('driver', '-')}, CUDA {c['cuda']}, torch {c['torch']} "
             f"({result['precision']})",
             format_table(rows, list(rows[0]) if rows else ["recipe"]),
             "cache build (one-off): " + ", ".join(f"{s} {t:.1f}s" for s, t in result["cache_build_s"].items())]
    lines += [f"ERROR {e}" for e in result["errors"]]
    lines.append(f"wall {result['wall_s']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="32 px, batch 8, 16 images: a smoke run")
    parser.add_argument("--recipes", nargs="+", choices=("winner", "default"), default=["winner", "default"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU on this machine; `--device cpu --quick` runs the smoke check")
    device = fit_path.select_device(args.device)
    result = run(make_plan(args.quick, tuple(args.recipes)), device)
    result["quick"] = args.quick
    publish(NAME, result, table(result), args.out, args.quick)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outcome = main()
    sys.exit(1 if outcome["errors"] or not outcome["results"] else 0)
