"""Small builders shared by tests: tiny valid datasets written with PIL."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"
# The architecture of the tests' throwaway trainings (the registry, the CLI, the channel flows): 6 MB
# of weights where resnet18, the product's default, has 45 MB, so every version those tests register
# moves 7 times fewer bytes through S3, checkpoints and caches. The Prefect UI's form offers it, so
# flow parameters accept it. Tests of an architecture name theirs.
TINY_ARCH = "mobilenet_v3_small"


def write_png(path: Path, size: int = 32, seed: int = 0, mode: str = "RGB") -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size, size, channels) if channels else (size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)


def write_dataset(root: Path, labels: dict[str, str], test_ids: list[str], size: int = 32, seed: int = 0) -> Path:
    """A competition-layout folder with random images; datasets of different ``seed`` share no image."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["Image,Label"] + [f"{k},{v}" for k, v in labels.items()]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    (root / "sample_submission.csv").write_text("\n".join(["Image,Label"] + [f"{t},0" for t in test_ids]) + "\n")
    for i, image_id in enumerate(labels):
        write_png(root / "train" / f"{image_id}.png", size, seed=seed * 100_000 + i)
    for i, image_id in enumerate(test_ids):
        write_png(root / "test" / f"{image_id}.png", size, seed=seed * 100_000 + 1000 + i)
    return root


def write_kaggle_dataset(root: Path, labels: dict[str, str], test_ids: list[str], size: int = 32) -> Path:
    """Kaggle's download of the competition: 'Human protein atlas/{train.csv,train/,test/}' and the
    template submission.csv (dummy label 0 per test image) one level above that folder."""
    inner = write_dataset(root / "Human protein atlas", labels, test_ids, size)
    (inner / "sample_submission.csv").rename(root / "submission.csv")
    return root


def zip_folder(folder: Path, zip_path: Path) -> Path:
    """Zip every file under folder with names relative to it (as Kaggle's download zip is)."""
    import zipfile

    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return zip_path


@contextmanager
def module_scratch(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder for a module-scoped fixture, removed when the fixture ends. pytest's retention policy
    ("failed", pyproject.toml) removes a passed test's own tmp_path at once, but a folder from
    tmp_path_factory only at the end of the session: trained models, stores and cluster homes of
    every module would otherwise pile up to gigabytes on the temp disk over one run."""
    root = tmp_path_factory.mktemp(name)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run_scratch(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder every xdist worker of this pytest run shares (each worker's own temp root is
    popen-gwN under the run's), or the session's own without xdist: for what one run computes once
    and its workers reuse (the migrated Prefect template). Gone with the run's temp folder."""
    root = tmp_path_factory.getbasetemp()
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / name


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """In-process training on one intra-op thread, restored afterwards. On two busy cores, two OpenMP
    threads wait on each other: a fast-tier test took 35 s beside another engineer's tests (load 1.8)
    against 4.6 s on a quiet machine. Tests that train in process check what happens, not speed."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ModuleClock:
    """The `time` module as one module of the code under test sees it, with some functions replaced:
    `monkeypatch.setattr(module, "time", ModuleClock(sleep=slept.append))`. Patching `time.sleep`
    itself replaces it for every thread of the test process (pytest's, the Prefect client's)."""

    def __init__(self, **replaced: object) -> None:
        self.__dict__.update(replaced)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def run_in_threads(target: Callable[[], object], count: int, timeout_s: float) -> list[BaseException]:
    """Run ``target`` in ``count`` threads at once and wait up to ``timeout_s`` for each; what any of
    them raised, kept for the test to assert on (a thread's exception is otherwise only a warning)."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)
    return errors
