"""Training images/s on a CUDA GPU: how close each data path gets to the model's own ceiling.

For each architecture and image size, with and without torch.compile, three ways to feed the
same training step (bf16 autocast, channels_last, AdamW):
  model-only  synthetic tensors already on the GPU: the ceiling the data path can at best reach
  naive       the course notebooks' DataLoader: PIL decode + torchvision transforms per batch
  fit         what protein.modeling.train.fit runs: iterate_batches from the decode-once cache (pinned
              memory and the prefetch thread on CUDA, ragged batch dropped) into train_one_epoch
and each feeding's ratio to the ceiling; `fit`'s ratio is the headline figure (target >= 80 %).
Each figure is the median of --repeats timed runs (default 3); warm-up excluded, cuda
synchronize around timing. Per group also: peak GPU memory, and inference images/s
(predict_probs, the evaluation and prediction path). A DDP variant (--ddp N, default: every GPU
when there are at least 2) runs `fit`'s path as N processes with DistributedDataParallel and
reports the summed images/s and its scaling over one process; it is skipped on fewer than 2 GPUs.
`--device cpu --quick` runs the same code at toy sizes as a smoke check (gloo for --ddp).

    python -m bench.gpu [--device cuda|cpu] [--quick] [--ddp N] [--out bench/results/gpu.json]
"""

from __future__ import annotations

import argparse
import gc
import json
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

from bench.common import bench_dataset, data_dir, format_table, machine_info, median, publish
from bench.naive import naive_dataset, naive_loader
from protein.cache import ImageCache, default_workers
from protein.config import TrainConfig
from protein.data import load_competition
from protein.labels import NUM_CLASSES
from protein.modeling.model import build_model
from protein.modeling.presets import EvalPreset, TrainPreset
from protein.modeling.train import (
    autocast_context,
    build_optimizer,
    iterate_batches,
    make_loss,
    predict_probs,
    prefetch,
    select_device,
    train_one_epoch,
)

log = logging.getLogger(__name__)

NAME = "gpu"
LOADERS = ("model-only", "naive", "fit")
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
    repeats: int
    # Compiled groups are skipped once this much time has passed, so the run stays bounded.
    budget_s: float


def make_plan(args: argparse.Namespace) -> Plan:
    cpus = os.cpu_count() or 1
    if args.quick:
        plan = Plan(archs=("resnet34", "efficientnet_b0"), sizes=(64,), compile_modes=(False,), batch_size=4,
                    warmup=2, steps=2, n_images=16, workers=2, repeats=3, budget_s=60)
    else:
        plan = Plan(archs=("resnet34", "efficientnet_b0"), sizes=(256, 512), compile_modes=(False, True),
                    batch_size=64, warmup=3, steps=20, n_images=512, workers=max(1, min(8, cpus)),
                    repeats=3, budget_s=args.budget_s)
    return Plan(
        archs=tuple(args.archs or plan.archs),
        sizes=tuple(args.sizes or plan.sizes),
        compile_modes=(False,) if args.no_compile else ((False, True) if args.compile else plan.compile_modes),
        batch_size=args.batch_size or plan.batch_size,
        warmup=plan.warmup,
        steps=args.steps or plan.steps,
        n_images=plan.n_images,
        workers=args.workers or plan.workers,
        repeats=max(args.repeats or plan.repeats, 1),
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
        self.channels_last = device.type == "cuda"  # as protein.modeling.train.fit decides
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

    def run(self, batches: Iterator[Batch], prepare: Callable[[Batch], Batch], warmup: int, steps: int,
            repeats: int = 1) -> float:
        """Median seconds of `repeats` runs of `steps` steps after `warmup` untimed ones, GPU work included."""
        losses = [self.step(*prepare(next(batches))) for _ in range(warmup)]
        sync(self.device)
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            # No .item() inside the loop: a host sync per step would hide the CPU/GPU overlap.
            losses += [self.step(*prepare(next(batches))) for _ in range(steps)]
            sync(self.device)
            timings.append(time.perf_counter() - started)
        if losses and not torch.isfinite(torch.stack(losses).float()).all():
            raise RuntimeError("loss is not finite")
        return median(timings) if timings else 0.0

    def fit_epoch(self, images: np.ndarray, targets: np.ndarray, steps: int, batch: int, seed: int) -> float:
        """Seconds for one `fit` epoch of `steps` batches: its batch source and train_one_epoch."""
        order = np.random.default_rng(seed).integers(0, len(images), steps * batch)
        cuda = self.device.type == "cuda"
        batches = iterate_batches(images, targets, order, batch, torch.Generator().manual_seed(seed),
                                  pin_memory=cuda, drop_last=True)
        if cuda:
            batches = prefetch(batches)
        preset = TrainPreset(channels_last=self.channels_last)
        sync(self.device)
        started = time.perf_counter()
        stats = train_one_epoch(self.model, batches, self.optimizer, self.scheduler, self.loss_fn, preset,
                                self.device, torch.Generator().manual_seed(seed))
        sync(self.device)
        if not np.isfinite(stats["train_loss"]):
            raise RuntimeError("loss is not finite")
        return time.perf_counter() - started


def measure_group(arch: str, size: int, compiled: bool, plan: Plan, device: torch.device,
                  naive_ds: Any, images: np.ndarray, targets: np.ndarray) -> list[dict[str, Any]]:
    trainer = Trainer(arch, device, compiled)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
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
    record("model-only", trainer.run(synthetic(), lambda b: b, 0, plan.steps, plan.repeats), warmup_s=warmup_s)

    # Naive: one long stream, so workers start once; warm-up lets their first burst drain.
    naive_warmup = plan.warmup + plan.workers
    naive_batches = iter(naive_loader(naive_ds, batch, plan.workers,
                                      num_samples=(naive_warmup + plan.repeats * plan.steps) * batch,
                                      pin_memory=device.type == "cuda"))

    def to_device(b: Batch) -> Batch:
        return (b[0].to(device, non_blocking=True).contiguous(memory_format=memory_format),
                b[1].to(device, non_blocking=True))

    record("naive", trainer.run(naive_batches, to_device, naive_warmup, plan.steps, plan.repeats),
           workers=plan.workers)
    del naive_batches

    # Fit: protein.modeling.train.fit's own batch source and loop (one warm-up epoch, then the repeats).
    trainer.fit_epoch(images, targets, plan.warmup, batch, seed=0)
    record("fit", median([trainer.fit_epoch(images, targets, plan.steps, batch, seed=1 + r)
                          for r in range(plan.repeats)]))

    ceiling = rows[0]["images_per_s"]
    for row in rows:
        row["ratio_to_ceiling"] = row["images_per_s"] / ceiling
    # Inference as evaluate and predict run it (eager model, eval preset, 2x the batch).
    eval_model = trainer.model._orig_mod if compiled else trainer.model  # type: ignore[union-attr]
    eval_preset = EvalPreset(channels_last=trainer.channels_last)
    predict_probs(eval_model, images, eval_preset, device, 2 * batch, np.arange(min(len(images), 2 * batch)))
    n_infer = min(len(images), max(plan.steps, 1) * 2 * batch)
    timings = []
    for _ in range(plan.repeats):
        sync(device)
        t0 = time.perf_counter()
        predict_probs(eval_model, images, eval_preset, device, 2 * batch, np.arange(n_infer))
        sync(device)
        timings.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    for row in rows:
        row["inference_images_per_s"] = n_infer / median(timings)
        row["peak_gpu_memory_mib"] = peak
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def ddp_worker(rank: int, world: int, port: int, arch: str, size: int, plan: Plan, device_type: str,
               cache_path: str, targets: np.ndarray, out: str) -> None:
    """One rank of the DDP variant: `fit`'s path with DistributedDataParallel (per-rank batch =
    plan.batch_size, so the global batch grows with the ranks). Rank 0 writes the timings."""
    from torch.nn.parallel import DistributedDataParallel

    from protein.modeling.distributed import Rank

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    try:
        images = np.load(cache_path, mmap_mode="r")
        torch.manual_seed(0)
        model = build_model(arch, NUM_CLASSES).to(device)
        if cuda:
            model = model.to(memory_format=torch.channels_last)
        ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        config = TrainConfig(arch=arch)
        optimizer, scheduler = build_optimizer(model, config, steps_per_epoch=100_000)
        loss_fn = make_loss(config)
        preset = TrainPreset(channels_last=cuda)
        me = Rank(rank, rank, world)
        global_batch = plan.batch_size * world

        def epoch(steps: int, seed: int) -> float:
            order = np.random.default_rng(seed).integers(0, len(images), steps * global_batch)
            batches = iterate_batches(images, targets, order, global_batch, torch.Generator().manual_seed(seed),
                                      pin_memory=cuda, drop_last=True, rank=me)
            if cuda:
                batches = prefetch(batches)
            torch.distributed.barrier()
            sync(device)
            started = time.perf_counter()
            train_one_epoch(ddp, batches, optimizer, scheduler, loss_fn, preset, device,
                            torch.Generator().manual_seed(seed + rank))
            sync(device)
            return time.perf_counter() - started

        epoch(plan.warmup, 0)
        timings = [epoch(plan.steps, 1 + r) for r in range(plan.repeats)]
        if rank == 0:
            Path(out).write_text(json.dumps({"seconds": median(timings), "global_batch": global_batch}))
    finally:
        torch.distributed.destroy_process_group()


def measure_ddp(world: int, arch: str, size: int, plan: Plan, device: torch.device, cache_path: Path,
                targets: np.ndarray, single: dict[str, Any] | None) -> dict[str, Any]:
    """The DDP variant's row: summed images/s over `world` processes and the scaling over the
    one-process `fit` row of the same group."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:  # a free loopback port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        mp.spawn(ddp_worker, args=(world, port, arch, size, plan, device.type, str(cache_path), targets, str(out)),
                 nprocs=world, join=True)
        timing = json.loads(out.read_text())
    images_per_s = plan.steps * timing["global_batch"] / timing["seconds"]
    return {"arch": arch, "image_size": size, "compile": False, "loader": f"fit ddp x{world}",
            "processes": world, "batch_size_per_process": plan.batch_size, "steps": plan.steps,
            "seconds": timing["seconds"], "images_per_s": images_per_s,
            "scaling_over_one_process": images_per_s / single["images_per_s"] if single else None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run(plan: Plan, device: torch.device, ddp: int = 0) -> dict[str, Any]:
    started = time.perf_counter()
    source_size = max(plan.sizes)
    dataset_dir = bench_dataset(plan.n_images, source_size)
    data = load_competition(dataset_dir)
    targets = data.targets

    results: list[dict[str, Any]] = []
    ddp_results: list[dict[str, Any]] = []
    skipped: list[str] = []
    if ddp < 2:
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        skipped.append(f"DDP variant: needs at least 2 GPUs (this machine has {gpus}); --ddp N forces it")
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
                    if compiled or ddp < 2:
                        continue
                    single = next((r for r in results if (r["arch"], r["image_size"], r["compile"], r["loader"])
                                   == (arch, size, False, "fit")), None)
                    try:
                        ddp_results.append(measure_ddp(ddp, arch, size, plan, device, Path(caches[size].filename),
                                                       targets, single))
                    except Exception as exc:
                        log.exception("%s DDP x%d failed", label, ddp)
                        errors.append(f"{label} DDP x{ddp}: {type(exc).__name__}: {exc}")
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
        "ddp": ddp_results,
        "skipped": skipped,
        "errors": errors,
        "wall_s": time.perf_counter() - started,
        "dataset": str(dataset_dir),
        "machine": machine_info(),
    }


def table(result: dict[str, Any]) -> str:
    rows = [{"arch": r["arch"], "px": r["image_size"], "compile": "yes" if r["compile"] else "no",
             "loader": r["loader"], "img/s": r["images_per_s"], "of ceiling": f"{r['ratio_to_ceiling']:.0%}",
             "infer img/s": r["inference_images_per_s"],
             "peak MiB": "-" if r["peak_gpu_memory_mib"] is None else f"{r['peak_gpu_memory_mib']:.0f}"}
            for r in result["results"]]
    rows += [{"arch": r["arch"], "px": r["image_size"], "compile": "no", "loader": r["loader"],
              "img/s": r["images_per_s"], "of ceiling": "-", "infer img/s": "-", "peak MiB": "-"}
             for r in result["ddp"]]
    lines = [f"{result['device_name']} ({result['device']}, {result['precision']}), "
             f"batch {result['plan']['batch_size']}, {result['plan']['steps']} timed steps, "
             f"naive DataLoader workers {result['plan']['workers']}",
             format_table(rows, ["arch", "px", "compile", "loader", "img/s", "of ceiling", "infer img/s", "peak MiB"]),
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
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure; the median is kept (3)")
    parser.add_argument("--ddp", type=int, default=None,
                        help="processes for the DDP variant (default: every GPU when there are >= 2; else skipped)")
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
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    result = run(plan, device, args.ddp if args.ddp is not None else (gpus if gpus >= 2 else 0))
    result["quick"] = args.quick
    publish(NAME, result, table(result), args.out, args.quick)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    outcome = main()
    sys.exit(1 if outcome["errors"] or not outcome["results"] else 0)
