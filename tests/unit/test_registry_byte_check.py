"""Promote and rollback hash the weights' bytes: weights rewritten in place with their recorded checksum
left as it was (valid-looking metadata) are refused, on the local store and on S3."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from protein.errors import RegistryError
from protein.registry import Registry
from protein.storage import LocalStore, S3Store, open_store

WEIGHTS = b"weights " * 4096


def register(registry: Registry, version: str, tmp_path: Path) -> str:
    path = tmp_path / f"{version}.safetensors"
    path.write_bytes(WEIGHTS + version.encode())
    return registry.register(path, {"arch": "resnet18", "image_size": 32}, version=version)


def tamper_keeping_metadata(registry: Registry, version: str) -> None:
    """Same size, other bytes; the sha256 recorded beside them still says the registered one."""
    key = f"models/{version}/model.safetensors"
    good = registry.store.get_bytes(key)
    bad = bytes(b ^ 0x5A for b in good)
    store = registry.store
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(bad)  # the sidecar is left as it was
    else:
        assert isinstance(store, S3Store)
        store._client().put_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}", Body=bad,
                                   Metadata={"sha256": hashlib.sha256(good).hexdigest()})
    assert registry.store.recorded_sha256(key) == (len(good), hashlib.sha256(good).hexdigest())


def check_refused(registry: Registry, version: str, call) -> None:  # noqa: ANN001
    with pytest.raises(RegistryError) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"model version {version}: weights ")
    assert f"models/{version}/model.safetensors" in message and "sha256" in message and "\n" not in message
    assert info.value.exit_code == 4


def promote_and_rollback_refuse_tampered_bytes(registry: Registry, tmp_path: Path) -> None:
    first, second = register(registry, "first", tmp_path), register(registry, "second", tmp_path)
    registry.promote(first, expected_champion=None)
    tamper_keeping_metadata(registry, second)
    check_refused(registry, second, lambda: registry.promote(second))
    assert registry.champion().champion == first

    registry.promote(register(registry, "third", tmp_path))
    tamper_keeping_metadata(registry, first)
    check_refused(registry, first, lambda: registry.rollback(reason="bad deploy"))
    assert registry.champion().champion == "third"


def test_local_promote_and_rollback_hash_the_bytes(tmp_path: Path) -> None:
    promote_and_rollback_refuse_tampered_bytes(Registry(open_store(str(tmp_path / "store"))), tmp_path)


@pytest.mark.integration
def test_s3_promote_and_rollback_hash_the_bytes(s3_bucket: str, tmp_path: Path) -> None:
    promote_and_rollback_refuse_tampered_bytes(Registry(open_store(s3_bucket)), tmp_path)


def test_the_cli_refuses_a_tampered_promotion_with_exit_4(tmp_path: Path, protein_cli) -> None:
    registry = Registry(open_store(str(tmp_path / "store")))
    version = register(registry, "v1", tmp_path)
    tamper_keeping_metadata(registry, version)
    result = protein_cli("models", "promote", version, "--store", registry.store.uri)
    assert result.returncode == 4
    errors = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(errors) == 1 and errors[0].startswith(f"protein models: error: model version {version}: weights ")
    assert registry.champion().champion is None
