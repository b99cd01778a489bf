"""A tiny model trained once per session on random images: enough to exercise registry,
prediction and round trips (it learns nothing, which no test here relies on)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from protein.config import TrainConfig
from protein.pipeline import train_and_register
from protein.registry import Registry
from protein.storage import open_store
from tests.helpers import TINY_ARCH, write_dataset

TINY_CONFIG = TrainConfig(arch=TINY_ARCH, image_size=32, epochs=1, batch_size=16, seed=0)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    labels = {str(i): " ".join(map(str, rng.sample(range(10), rng.randint(1, 2)))) for i in range(40)}
    return write_dataset(tmp_path_factory.mktemp("tiny") / "ds", labels, [str(500 + i) for i in range(12)], size=48)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> dict:
    root = tmp_path_factory.mktemp("trained")
    store, cache = str(root / "store"), root / "cache"
    result = train_and_register(tiny_dataset, store, TINY_CONFIG, cache_dir=cache)
    return {**result, "store": store, "cache": cache, "data": tiny_dataset}


@pytest.fixture
def registry(trained: dict, tmp_path: Path) -> Registry:
    """A fresh local store holding a copy of the trained version, so tests never share a champion."""
    target = Registry(open_store(str(tmp_path / "store")))
    target.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    return target


@pytest.fixture(params=["local", "s3"])
def any_registry(request: pytest.FixtureRequest, trained: dict, tmp_path: Path) -> Registry:
    """The same on the local store and on the moto S3 server."""
    uri = str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_bucket")
    target = Registry(open_store(uri))
    target.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    return target
