"""Pool workers must not inherit the parent's signal handlers (Prefect installs one for SIGTERM,
which turned every pool shutdown into TerminationSignal tracebacks in the run log)."""

from __future__ import annotations

import signal

import pytest

from protein.pools import pool_context


def sigterm_handler_name(_: int) -> str:
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__name__", str(handler))


def parents_handler(signum: int, frame: object) -> None:  # stands in for Prefect's handler
    raise RuntimeError("the parent's SIGTERM handler ran in a pool worker")


def test_pool_workers_start_without_the_parents_sigterm_handler() -> None:
    previous = signal.signal(signal.SIGTERM, parents_handler)
    try:
        with pool_context().Pool(1) as pool:
            in_worker = pool.map(sigterm_handler_name, [0])[0]
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_worker != "parents_handler"


class PoolStarted(Exception):
    """Raised by the stand-in pools below once they have recorded how they were asked to start."""


class RecordingContext:
    """A pool context whose Pool records its keyword arguments and starts nothing."""

    def __init__(self) -> None:
        self.started: dict = {}

    def Pool(self, *args: object, **kwargs: object) -> None:  # noqa: N802 (multiprocessing's name)
        self.started = kwargs
        raise PoolStarted


def runs_its_initializer_ignoring_sigint(started: dict) -> bool:
    """Run the pool's initializer here as a worker would, and say whether SIGINT is then ignored."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        started["initializer"](*started.get("initargs", ()))
        return signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_every_process_pool_starts_workers_that_ignore_ctrl_c(tmp_path, monkeypatch) -> None:
    """Ctrl-C reaches the whole process group: workers that do not ignore it print a traceback each
    before the command's one `interrupted` line. The decode cache, synth and validation pools all
    start their workers with an initializer that ignores SIGINT."""
    import numpy as np

    import protein.cache
    import protein.synth.dataset
    import protein.validation.images
    from protein.config import SynthConfig
    from protein.data import load_competition
    from protein.synth import generate_dataset
    from protein.validation.images import POOL_MIN_IMAGES_DECODE, ImageReader, inspect_images
    from tests.helpers import write_dataset

    started_by: dict[str, dict] = {}

    class RecordingExecutor:
        def __init__(self, *args: object, **kwargs: object) -> None:
            started_by["cache"] = kwargs
            raise PoolStarted

    monkeypatch.setattr(protein.cache, "ProcessPoolExecutor", RecordingExecutor)
    root = write_dataset(tmp_path / "ds", {str(i): "0" for i in range(2 * protein.cache.CHUNK)}, ["9"], size=16)
    with pytest.raises(PoolStarted):
        protein.cache.decode_all(load_competition(root).source, [f"train/{i}.png" for i in range(128)], 16,
                                 np.empty((128, 16, 16, 3), np.uint8), workers=2)

    synth_context = RecordingContext()
    monkeypatch.setattr(protein.synth.dataset, "pool_context", lambda: synth_context)
    with pytest.raises(PoolStarted):
        generate_dataset(SynthConfig(train=4, test=0, size=16, workers=2), tmp_path / "synth")
    started_by["synth"] = synth_context.started

    validation_context = RecordingContext()
    monkeypatch.setattr(protein.validation.images, "pool_context", lambda: validation_context)
    monkeypatch.setattr(protein.validation.images.os, "cpu_count", lambda: 2)
    reader = ImageReader(load_competition(root).source, check_pixels=True, max_bytes=1 << 20)
    with pytest.raises(PoolStarted):
        inspect_images(reader, [("train", 1, "0", "train/0.png")] * POOL_MIN_IMAGES_DECODE)
    started_by["validation"] = validation_context.started

    assert {pool: runs_its_initializer_ignoring_sigint(started) for pool, started in started_by.items()} == {
        "cache": True, "synth": True, "validation": True}
