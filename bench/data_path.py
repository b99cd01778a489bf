"""Images/s to deliver training batches: naive per-epoch PNG decode vs the decode-once cache.

Both paths end where a training step hands the batch to the model: a (N, 3, S, S) normalised,
augmented float32 tensor. Naive: the course notebooks' Dataset (PIL open + torchvision
Resize/ToTensor per image, every epoch) behind a DataLoader with 2 workers. Cache:
ImageCache.build once (timed separately), then each epoch iterate_batches + TrainPreset.
Same images, same machine, same run; medians over whole epochs.

The headline runs on real competition PNG bytes: every train image is a copy of the real
reference image (shared/data/real/test/10034.png), because the synthetic generator's PNG
encoder makes files that decode about 1.6x faster than the real ones and would flatter the naive
path. The same measurement on the synthetic PNGs is reported beside it (`synthetic_png`).

    python -m bench.data_path [--quick] [--n-images 400] [--image-size 256] [--repeats 7]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import bench_dataset, data_dir, format_table, machine_info, median, publish, time_repeats
from bench.naive import naive_dataset, naive_loader
from protein.cache import ImageCache, default_workers
from protein.config import COMPETITION_IMAGE_SIZE
from protein.data import decode_png, load_competition
from protein.modeling.batches import iterate_batches
from protein.modeling.presets import TrainPreset

log = logging.getLogger(__name__)

NAME = "data_path"
TARGET_RATIO = 20.0
REAL_REFERENCE_PNG = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "test" / "10034.png"


def png_decode_ms(path: Path, repeats: int = 20) -> float:
    """Median single-thread decode time of one PNG file, in ms."""
    raw = path.read_bytes()
    return 1e3 * median(time_repeats(lambda: decode_png(raw, str(path)), repeats, warmup=2))


def cache_epoch(images: np.ndarray, targets: np.ndarray, preset: Callable[..., torch.Tensor],
                batch_size: int) -> Callable[[], None]:
    """One epoch of what train_one_epoch does before the model: iterate_batches + preset."""
    indices = np.arange(len(images))
    generator = torch.Generator().manual_seed(0)
    size = images.shape[1]

    def epoch() -> None:
        for x, _ in iterate_batches(images, targets, indices, batch_size, generator):
            out = preset(x, generator)
            assert out.shape[1:] == (3, size, size)

    return epoch


def real_png_dataset(like: Path) -> Path:
    """The synthetic dataset's layout and labels, with every train image a hard link to one copy
    of the real reference PNG (512x512 RGB, encoded as the competition's files are)."""
    out = like.with_name(like.name.replace("synth-", "realpng-", 1))
    ids = [line.split(",")[0] for line in (like / "train.csv").read_text().splitlines()[1:] if line]
    if (out / "train").is_dir() and len(list((out / "train").iterdir())) == len(ids):
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "train").mkdir(parents=True)
    (tmp / "test").mkdir()
    master = tmp / "reference.png.src"
    shutil.copyfile(REAL_REFERENCE_PNG, master)
    for image_id in ids:
        os.link(master, tmp / "train" / f"{image_id}.png")
    for name in ("train.csv", "sample_submission.csv"):
        shutil.copyfile(like / name, tmp / name)
    for test_png in (like / "test").iterdir():
        shutil.copyfile(test_png, tmp / "test" / test_png.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def run(n_images: int, image_size: int, source_size: int, batch_size: int, workers: int,
        repeats: int, real_png: bool = True) -> dict[str, Any]:
    dataset_dir = bench_dataset(n_images, source_size)
    if real_png:
        dataset_dir = real_png_dataset(dataset_dir)
    data = load_competition(dataset_dir)
    targets = data.targets

    # Naive: a new DataLoader iterator per epoch, as `for xb, yb in train_dl` does (workers restart).
    torch.manual_seed(0)
    naive = naive_dataset(data, dataset_dir, image_size)

    def naive_epoch() -> None:
        for x, _ in naive_loader(naive, batch_size, workers):
            assert x.shape[1:] == (3, image_size, image_size)

    load_before = os.getloadavg()[0]
    # Cache: built into a fresh folder so the one-off decode is really measured.
    with tempfile.TemporaryDirectory(dir=_mkdir(data_dir())) as tmp:
        started = time.perf_counter()
        images = ImageCache(Path(tmp)).build(data, "train", image_size, workers=default_workers())
        build_s = time.perf_counter() - started
        epochs = {
            "naive": naive_epoch,
            "cache": cache_epoch(images, targets, TrainPreset(), batch_size),
        }
        samples: dict[str, list[float]] = {name: [] for name in epochs}
        for epoch in epochs.values():  # warm-up: first worker start, page cache, allocator
            epoch()
        # Interleaved rounds, so a burst of other work on a shared machine hits every path alike.
        for _ in range(repeats):
            for name, epoch in epochs.items():
                samples[name] += time_repeats(epoch, 1 if name == "naive" else 2)
        del epochs, images  # close the memory map before its folder goes
    naive_s, cache_s = samples["naive"], samples["cache"]

    naive_ips = n_images / median(naive_s)
    cache_ips = n_images / median(cache_s)
    synth_png = next((dataset_dir / "train").iterdir())
    decode = {"benchmark_png": png_decode_ms(synth_png)}
    if REAL_REFERENCE_PNG.is_file():
        # The synthetic PNGs compress differently from the real ones; this says which way it biases.
        decode["real_reference_png"] = png_decode_ms(REAL_REFERENCE_PNG)
    return {
        "benchmark": NAME,
        "image_size": image_size,
        "source_size": source_size,
        "n_images": n_images,
        "png_source": "real reference PNG copies" if real_png else "synthetic PNGs",
        "batch_size": batch_size,
        "repeats": repeats,
        "naive_workers": workers,
        "naive_images_per_s": naive_ips,
        "cache_images_per_s": cache_ips,
        "ratio": cache_ips / naive_ips,
        # Best epochs: least touched by other work on a shared machine (medians are the headline).
        "best_naive_images_per_s": n_images / min(naive_s),
        "best_cache_images_per_s": n_images / min(cache_s),
        "best_ratio": min(naive_s) / min(cache_s),
        "target_ratio": TARGET_RATIO,
        "meets_target": cache_ips / naive_ips >= TARGET_RATIO,
        "cache_build_s": build_s,
        "cache_build_images_per_s": n_images / build_s,
        "cache_build_workers": default_workers(),
        "load_average_1m": [load_before, os.getloadavg()[0]],
        "naive_epoch_s": naive_s,
        "cache_epoch_s": cache_s,
        "png_decode_ms": decode,
        "dataset": str(dataset_dir),
        "machine": machine_info(),
    }


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def table(result: dict[str, Any]) -> str:
    rows = [
        {"path": "naive PNG decode (DataLoader, "
                 f"{result['naive_workers']} workers)", "images/s": result["naive_images_per_s"],
         "epoch s (median)": median(result["naive_epoch_s"]), "vs naive": 1.0},
        {"path": "decode-once cache + TrainPreset", "images/s": result["cache_images_per_s"],
         "epoch s (median)": median(result["cache_epoch_s"]), "vs naive": result["ratio"]},
    ]
    header = (f"data path ({result['png_source']}): {result['n_images']} images {result['source_size']}px -> "
              f"{result['image_size']}px, "
              f"batch {result['batch_size']}, medians of {result['repeats']} naive / {2 * result['repeats']} cache "
              f"epochs, interleaved; {result['machine']['cpu_count']} CPUs, load "
              f"{result['load_average_1m'][0]:.1f}->{result['load_average_1m'][1]:.1f}")
    footer = (f"cache build (one-off): {result['cache_build_s']:.2f}s "
              f"({result['cache_build_images_per_s']:.0f} images/s, {result['cache_build_workers']} workers); "
              f"ratio {result['ratio']:.1f}x (target >= {result['target_ratio']:.0f}x: "
              f"{'met' if result['meets_target'] else 'NOT met'}); best epochs: naive "
              f"{result['best_naive_images_per_s']:.0f}, cache {result['best_cache_images_per_s']:.0f} images/s")
    return "\n".join([header, format_table(rows, ["path", "images/s", "epoch s (median)", "vs naive"]), footer])


def source_size_is_real(source_size: int) -> bool:
    return source_size == COMPETITION_IMAGE_SIZE


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.data_path", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few images and repeats: a smoke run")
    parser.add_argument("--n-images", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--source-size", type=int, default=COMPETITION_IMAGE_SIZE)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="naive DataLoader workers (the notebooks used 2)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    n_images = args.n_images or (64 if args.quick else 400)
    repeats = args.repeats or (2 if args.quick else 7)
    real_png = REAL_REFERENCE_PNG.is_file() and source_size_is_real(args.source_size)
    result = run(n_images, args.image_size, args.source_size, args.batch_size, args.workers, repeats, real_png)
    if real_png:
        synthetic = run(n_images, args.image_size, args.source_size, args.batch_size, args.workers, repeats, False)
        result["synthetic_png"] = {k: synthetic[k] for k in (
            "naive_images_per_s", "cache_images_per_s", "ratio", "naive_epoch_s", "cache_epoch_s", "png_decode_ms")}
        print(table(synthetic))
    result["quick"] = args.quick
    publish(NAME, result, table(result), args.out, args.quick)
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
