"""Training images/s on a CUDA GPU: how close each data path gets to the model's own ceiling.

For each architecture and image size, with and without torch.compile, three ways to feed the
same training step (bf16 autocast, channels_last, AdamW):
  model-only  synthetic tensors already on the GPU: the ceiling the data path can at best reach
  naive       the course notebooks' DataLoader: PIL decode + torchvision transforms per batch
  cache       decode-once cache slices (iterate_batches) moved to the GPU, TrainPreset there
and each feeding's ratio to the ceiling. Warm-up excluded, cuda synchronize around timing.
`--device cpu --quick` runs the same code at toy sizes as a smoke check.

    python -m bench.gpu [--device cuda|cpu] [--quick] [--out bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import bench_dataset, data_dir, format_table, machine_info, publish
from bench.naive import naive_dataset, naive_loader
from protein.cache import ImageCache, default_workers
from protein.config import TrainConfig
from protein.data import load_competition
from protein.labels import NUM_CLASSES
from protein.model import build_model
from protein.presets import TrainPreset
from protein.train import autocast_context, build_optimizer, iterate_batches, make_loss, select_device

log = logging.getLogger(__name__)

NAME = "gpu"
LOADERS = ("model-only", "naive", "cache")
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Plan:
    archs: tuple[str, ...]
    sizes: tuple[int, ...]
    compile_modes: tuple[bool, ...]
    batch_size: int
    warmup: int
    steps: int
    n_images: int
    workers: int
    # Compiled groups are skipped once this much time has passed, so the run stays bounded.
    budget_s: float


def make_plan(args: argparse.Namespace) -> Plan:
    cpus = os.cpu_count() or 1
    if args.quick:
        plan = Plan(archs=("resnet34", "efficientnet_b0"), sizes=(64,), compile_modes=(False,), batch_size=4,
                    warmup=2, steps=2, n_images=16, workers=2, budget_s=60)
    else:
        plan = Plan(archs=("resnet34", "efficientnet_b0"), sizes=(256, 512), compile_modes=(False, True),
                    batch_size=64, warmup=3, steps=20, n_images=512, workers=max(1, min(8, cpus)),
                    budget_s=args.budget_s)
    return Plan(
        archs=tuple(args.archs or plan.archs),
        sizes=tuple(args.sizes or plan.sizes),
        compile_modes=(False,) if args.no_compile else ((False, True) if args.compile else plan.compile_modes),
        batch_size=args.batch_size or plan.batch_size,
        warmup=plan.warmup,
        steps=args.steps or plan.steps,
        n_images=plan.n_images,
        workers=args.workers or plan.workers,
        budget_s=plan.budget_s,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """One model, optimizer and loss; `step` is the training step every feeding shares."""

    def __init__(self, arch: str, device: torch.device, compiled: bool) -> None:
        torch.manual_seed(0)
        self.device = device
        self.channels_last = device.type == "cuda"  # as protein.train.fit decides
        model = build_model(arch, NUM_CLASSES).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        config = TrainConfig(arch=arch)
        # A long planned schedule: OneCycleLR refuses to step past its total.
        self.optimizer, self.scheduler = build_optimizer(model, config, steps_per_epoch=100_000)
        self.loss_fn = make_loss(config)
        # Static shapes: each size gets its own Trainer, so nothing needs a dynamic graph.
        self.model = torch.compile(model, dynamic=False) if compiled else model
        self.model.train()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device):
            loss = self.loss_fn(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def run(self, batches: Iterator[Batch], prepare: Callable[[Batch], Batch], warmup: int, steps: int) -> float:
        """Seconds for `steps` steps after `warmup` untimed ones, GPU work included."""
        losses = [self.step(*prepare(next(batches))) for _ in range(warmup)]
        sync(self.device)
        started = time.perf_counter()
        # No .item() inside the loop: a host sync per step would hide the CPU/GPU overlap.
        losses += [self.step(*prepare(next(batches))) for _ in range(steps)]
        sync(self.device)
        seconds = time.perf_counter() - started
        if losses and not torch.isfinite(torch.stack(losses).float()).all():
            raise RuntimeError("loss is not finite")
        return seconds


def measure_group(arch: str, size: int, compiled: bool, plan: Plan, device: torch.device,
                  naive_ds: Any, images: np.ndarray, targets: np.ndarray) -> list[dict[str, Any]]:
    trainer = Trainer(arch, device, compiled)
    batch = plan.batch_size
    memory_format = torch.channels_last if trainer.channels_last else torch.contiguous_format
    rows: list[dict[str, Any]] = []

    def record(loader: str, seconds: float, **extra: Any) -> None:
        rows.append({"arch": arch, "image_size": size, "compile": compiled, "loader": loader, "batch_size": batch,
                     "steps": plan.steps, "seconds": seconds, "images_per_s": plan.steps * batch / seconds, **extra})

    # Ceiling first: its warm-up also pays for compilation and cuDNN autotuning, once.
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=memory_format)
    y = (torch.rand(batch, NUM_CLASSES, generator=gen) < 0.2).float().to(device)

    def synthetic() -> Iterator[Batch]:
        while True:
            yield x, y

    compile_started = time.perf_counter()
    trainer.run(synthetic(), lambda b: b, plan.warmup, 0)
    warmup_s = time.perf_counter() - compile_started
    record("model-only", trainer.run(synthetic(), lambda b: b, 0, plan.steps), warmup_s=warmup_s)

    # Naive: one long stream, so workers start once; warm-up lets their first burst drain.
    naive_warmup = plan.warmup + plan.workers
    naive_batches = iter(naive_loader(naive_ds, batch, plan.workers, num_samples=(naive_warmup + plan.steps) * batch,
                                      pin_memory=device.type == "cuda"))

    def to_device(b: Batch) -> Batch:
        return (b[0].to(device, non_blocking=True).contiguous(memory_format=memory_format),
                b[1].to(device, non_blocking=True))

    record("naive", trainer.run(naive_batches, to_device, naive_warmup, plan.steps), workers=plan.workers)
    del naive_batches

    # Cache: what protein.train.train_one_epoch does with each batch from iterate_batches.
    preset = TrainPreset(channels_last=trainer.channels_last)
    aug_gen = torch.Generator().manual_seed(0)
    order = np.random.default_rng(0).integers(0, len(images), (plan.warmup + plan.steps) * batch)
    cache_batches = iterate_batches(images, targets, order, batch)

    def augment_on_device(b: Batch) -> Batch:
        return preset(b[0].to(device, non_blocking=True), aug_gen), b[1].to(device, non_blocking=True)

    record("cache", trainer.run(cache_batches, augment_on_device, plan.warmup, plan.steps))

    ceiling = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_ceiling"] = row["images_per_s"] / ceiling
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run(plan: Plan, device: torch.device) -> dict[str, Any]:
    started = time.perf_counter()
    source_size = max(plan.sizes)
    dataset_dir = bench_dataset(plan.n_images, source_size)
    data = load_competition(dataset_dir)
    targets = data.targets

    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    errors: list[str] = []
    cache_build_s: dict[str, float] = {}
    data_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir()) as tmp:
        # Built before CUDA starts: the cache decodes in forked worker processes.
        caches = {}
        for size in plan.sizes:
            t0 = time.perf_counter()
            caches[size] = ImageCache(Path(tmp)).build(data, "train", size, workers=default_workers())
            cache_build_s[str(size)] = time.perf_counter() - t0
        for compiled in plan.compile_modes:  # every eager group first: they are cheap and always fit
            for arch in plan.archs:
                for size in plan.sizes:
                    label = f"{arch} {size}px {'compiled' if compiled else 'eager'}"
                    elapsed = time.perf_counter() - started
                    if compiled and elapsed > plan.budget_s:
                        skipped.append(f"{label}: time budget ({elapsed:.0f}s > {plan.budget_s:.0f}s)")
                        log.warning("skipping %s", skipped[-1])
                        continue
                    log.info("measuring %s", label)
                    try:
                        results += measure_group(arch, size, compiled, plan, device,
                                                 naive_dataset(data, dataset_dir, size), caches[size], targets)
                    except Exception as exc:  # one failing config must not lose the others' numbers
                        log.exception("%s failed", label)
                        errors.append(f"{label}: {type(exc).__name__}: {exc}")
        del caches
    return {
        "benchmark": NAME,
        "device": str(device),
        "device_name": device_name(device),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last": device.type == "cuda",
        "plan": plan.__dict__,
        "cache_build_s": cache_build_s,
        "results": results,
        "skipped": skipped,
        "errors": errors,
        "wall_s": time.perf_counter() - started,
        "dataset": str(dataset_dir),
        "machine": machine_info(),
    }


def table(result: dict[str, Any]) -> str:
    rows = [{"arch": r["arch"], "px": r["image_size"], "compile": "yes" if r["compile"] else "no",
             "loader": r["loader"], "img/s": r["images_per_s"], "of ceiling": f"{r['ratio_to_ceiling']:.0%}"}
            for r in result["results"]]
    lines = [f"{result['device_name']} ({result['device']}, {result['precision']}), "
             f"batch {result['plan']['batch_size']}, {result['plan']['steps']} timed steps, "
             f"naive DataLoader workers {result['plan']['workers']}",
             format_table(rows, ["arch", "px", "compile", "loader", "img/s", "of ceiling"]),
             "cache build (one-off): " + ", ".join(f"{s}px {t:.1f}s" for s, t in result["cache_build_s"].items())]
    lines += [f"skipped {s}" for s in result["skipped"]] + [f"ERROR {e}" for e in result["errors"]]
    lines.append(f"wall {result['wall_s']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="64 px, batch 4, 2 steps, no compile: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--archs", nargs="+", default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--workers", type=int, default=None, help="naive DataLoader workers")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="start no compiled group after this many seconds (default 150)")
    compile_group = parser.add_mutually_exclusive_group()
    compile_group.add_argument("--compile", action="store_true", help="also measure torch.compile in --quick")
    compile_group.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU on this machine; `--device cpu --quick` runs the smoke check")
    device = select_device(args.device)
    plan = make_plan(args)
    result = run(plan, device)
    result["quick"] = args.quick
    publish(NAME, result, table(result), args.out, args.quick)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outcome = main()
    sys.exit(1 if outcome["errors"] or not outcome["results"] else 0)
