"""The worker image installs requirements.lock, pinned and hash-checked, for its variant
(deployments/worker_lock.py, Dockerfile)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from deployments.worker_lock import lock_for_variant, main
from tests.unit.test_lock import locked

ROOT = Path(__file__).resolve().parents[2]
LOCK = (ROOT / "requirements.lock").read_text()
CPU_INDEX_OR_CUDA_ONLY = {"torch", "torchvision", "triton"}
# The CPU torch wheel's own requirements (its METADATA): pure Python, from the lock.
CPU_TORCH_NEEDS = {"filelock", "typing-extensions", "sympy", "networkx", "jinja2", "fsspec", "setuptools"}


def test_the_cuda_image_takes_the_whole_lock() -> None:
    assert lock_for_variant(LOCK, "cuda") == LOCK


def test_the_cpu_image_takes_every_pin_but_torch_and_the_cuda_libraries_each_with_its_hashes() -> None:
    whole, cpu = locked(LOCK), locked(lock_for_variant(LOCK, "cpu"))
    left_out = set(whole) - set(cpu)
    assert left_out >= CPU_INDEX_OR_CUDA_ONLY and any(name.startswith("nvidia-") for name in left_out)
    assert all(name in CPU_INDEX_OR_CUDA_ONLY or name.startswith(("nvidia-", "cuda-")) for name in left_out), left_out
    # What the lock has only for what was left out (by its "# via" lines) is what the CPU wheel of
    # torch, installed without its dependencies, still needs: nothing CUDA's stays behind.
    only_for_left_out = sorted(name for name, (_, _, vias) in cpu.items() if vias and vias <= left_out)
    assert set(only_for_left_out) <= CPU_TORCH_NEEDS, only_for_left_out
    assert all(cpu[name] == whole[name] for name in cpu)  # same version, hashed, same reasons
    # Each kept pin keeps every one of its hash lines, not only the first.
    assert hash_counts(lock_for_variant(LOCK, "cpu")) == {
        name: count for name, count in hash_counts(LOCK).items() if name in cpu}


def hash_counts(lock: str) -> dict[str, int]:
    return {block.split("==")[0].lower(): block.count("--hash=") for block in re.split(r"\n(?=[A-Za-z0-9])", lock)
            if "==" in block.split("\n")[0]}


def test_an_unknown_variant_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(LOCK))
    assert main(["rocm"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["error: give the image variant, one of cpu, cuda (got rocm)"]
    with pytest.raises(ValueError, match="not 'rocm'"):
        lock_for_variant(LOCK, "rocm")


def test_the_dockerfile_installs_the_lock_hash_checked_and_the_project_without_resolving() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "python worker_lock.py \"$VARIANT\" < requirements.lock > /tmp/worker.lock" in dockerfile
    assert "pip install --require-hashes --no-deps -r /tmp/worker.lock" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    # Nothing else is installed by name, unpinned (the CPU variant's torch is pinned by version).
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert all("--no-deps" in line for line in installs), installs
