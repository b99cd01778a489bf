"""Writing a synthetic dataset in the competition layout, with the hidden test labels beside it."""

from __future__ import annotations

import csv
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protein.atomic import naming
from protein.config import SynthConfig
from protein.errors import DataError
from protein.labels import format_label_set
from protein.pools import ignore_interrupts, pool_context
from protein.synth.labels import label_cell, perturb_label_set, sample_label_sets
from protein.synth.png import encode_png
from protein.synth.render import render_image

logger = logging.getLogger(__name__)

SPLITS = ("train", "test")
# The real ids are integers below ~32,000; drawing from the same range keeps them looking alike.
ID_SPACE = 32_000


@dataclass(frozen=True)
class SynthSummary:
    """Where a generated dataset went, how many images it has, and how long it took."""

    out: Path
    truth: Path
    train: int
    test: int
    seconds: float


@dataclass(frozen=True)
class _Job:
    path: str
    labels: tuple[int, ...]
    size: int
    seed: int
    split: int
    index: int


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    # Keyed by position, not by draw order, so any worker renders the same image.
    return np.random.default_rng([seed, split, index])


def _render_job(job: _Job) -> None:
    rgb = render_image(frozenset(job.labels), job.size, _image_rng(job.seed, job.split, job.index))
    with naming(Path(job.path)):
        Path(job.path).write_bytes(encode_png(rgb))


def _render_chunk(jobs: Sequence[_Job]) -> int:
    for job in jobs:
        _render_job(job)
    return len(jobs)


def _chunks(jobs: Sequence[_Job], n: int) -> Iterable[Sequence[_Job]]:
    for start in range(0, len(jobs), n):
        yield jobs[start : start + n]


@dataclass(frozen=True)
class Plan:
    """Everything about a dataset except its pixels; train rows first, then test rows."""

    ids: list[str]
    true_sets: list[frozenset[int]]  # what the images show
    recorded: list[frozenset[int]]  # what train.csv and the truth file say (after label noise)
    train_cells: list[str]  # train.csv label cells, some deliberately out of ascending order


def plan(config: SynthConfig) -> Plan:
    # Independent streams, so the amount of label noise never changes ids, images or label order.
    ids_rng, sets_rng, noise_rng, order_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, 7]).spawn(4)
    )
    total = config.train + config.test
    ids = [str(i) for i in ids_rng.choice(max(ID_SPACE, 2 * total), size=total, replace=False).tolist()]
    true_sets = sample_label_sets(total, sets_rng)
    recorded: list[frozenset[int]] = []
    for label_set in true_sets:
        # Drawn for every image, so a higher noise level perturbs a superset of the same images.
        hit = noise_rng.random() < config.label_noise
        perturbed = perturb_label_set(label_set, noise_rng)
        recorded.append(perturbed if hit else label_set)
    train_cells = [label_cell(s, order_rng) for s in recorded[: config.train]]
    return Plan(ids, true_sets, recorded, train_cells)


def _check_config(config: SynthConfig) -> None:
    if config.train < 0 or config.test < 0:
        raise ValueError(f"train and test counts must be >= 0, got {config.train} and {config.test}")
    if not 16 <= config.size <= 4096:
        raise ValueError(f"size must be 16-4096 px, got {config.size}")
    if not 0.0 <= config.label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {config.label_noise}")
    if config.workers < 1:
        raise ValueError(f"workers must be >= 1, got {config.workers}")
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0, got {config.seed}")


def _refuse_existing(out: Path, truth: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"refusing to write the synthetic dataset into {out}: it exists and is not empty")
    if truth.exists():
        raise DataError(f"refusing to overwrite the test truth file {truth}: it already exists")
    if truth.resolve().is_relative_to(out.resolve()):
        raise DataError(f"the test truth file {truth} must be outside the dataset folder {out}")


def _write_csv(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    with naming(path), path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("Image", "Label"))
        writer.writerows(rows)


def generate_dataset(
    config: SynthConfig,
    out: Path,
    truth: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic dataset in the competition layout to out, and the hidden test labels to truth.

    truth defaults to the sibling file "<out>-test-labels.csv". Everything is built beside out
    and renamed into place at the end; an existing non-empty out raises DataError. The same
    config gives byte-identical files whatever the number of workers. progress, if given,
    is called with the number of images just finished.
    """
    _check_config(config)
    started = time.perf_counter()
    out = Path(out)
    truth = Path(truth) if truth is not None else out.with_name(f"{out.name}-test-labels.csv")
    _refuse_existing(out, truth)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth.parent.mkdir(parents=True, exist_ok=True)

    rows = plan(config)
    ids, true_sets, recorded = rows.ids, rows.true_sets, rows.recorded

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp_truth: Path | None = None
    try:
        os.chmod(tmp, 0o755)
        jobs: list[_Job] = []
        for split_index, split in enumerate(SPLITS):
            (tmp / split).mkdir()
            offset = 0 if split == "train" else config.train
            count = config.train if split == "train" else config.test
            for index in range(count):
                name = tmp / split / f"{ids[offset + index]}.png"
                labels = tuple(sorted(true_sets[offset + index]))
                jobs.append(_Job(str(name), labels, config.size, config.seed, split_index, index))
        logger.info(
            "rendering %d train + %d test images at %d px with %d worker(s)",
            config.train,
            config.test,
            config.size,
            config.workers,
        )
        _render_all(jobs, config.workers, progress)

        train_rows = list(zip(ids[: config.train], rows.train_cells, strict=True))
        test_ids = ids[config.train :]
        _write_csv(tmp / "train.csv", train_rows)
        _write_csv(tmp / "sample_submission.csv", [(i, "0") for i in test_ids])
        fd, name = tempfile.mkstemp(prefix=f".{truth.name}.tmp-", dir=truth.parent)
        os.close(fd)
        tmp_truth = Path(name)
        os.chmod(tmp_truth, 0o644)
        test_labels = [format_label_set(s) for s in recorded[config.train :]]
        _write_csv(tmp_truth, zip(test_ids, test_labels, strict=True))

        try:
            os.replace(tmp, out)
        except OSError as exc:  # someone filled out while we worked
            raise DataError(f"could not move the synthetic dataset into {out}: {exc}") from exc
        os.replace(tmp_truth, truth)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp_truth is not None:
            tmp_truth.unlink(missing_ok=True)
        raise

    seconds = time.perf_counter() - started
    logger.info("wrote %s (%d train, %d test) and %s in %.1f s", out, config.train, config.test, truth, seconds)
    return SynthSummary(out=out, truth=truth, train=config.train, test=config.test, seconds=seconds)


def _render_all(jobs: Sequence[_Job], workers: int, progress: Callable[[int], None] | None) -> None:
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            _render_job(job)
            if progress is not None:
                progress(1)
        return
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    chunks = list(_chunks(jobs, chunk))
    with pool_context().Pool(processes=min(workers, len(chunks)), initializer=ignore_interrupts) as pool:
        for done in pool.imap_unordered(_render_chunk, chunks):
            if progress is not None:
                progress(done)
