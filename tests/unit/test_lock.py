"""requirements.lock pins, with hashes, exactly what pyproject.toml asks for (`make lock` refreshes it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "protein-pipeline (pyproject.toml)"


def declared(pyproject: str) -> dict[str, Requirement]:
    project = tomllib.loads(pyproject)["project"]
    wanted = list(project["dependencies"]) + list(project.get("optional-dependencies", {}).get("dev", []))
    return {canonicalize_name(r.name): r for r in map(Requirement, wanted)}


def locked(lock: str) -> dict[str, tuple[str, bool, set[str]]]:
    """name -> (version, has a hash, what it is there for), from pip-compile's output."""
    pins: dict[str, tuple[str, bool, set[str]]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", lock):
        head = re.match(r"([A-Za-z0-9_.\-]+)==([^\s\\;]+)", block)
        if not head:
            continue
        vias = set(re.findall(r"#\s+via\s+(.+)", block))
        vias |= {v.strip() for v in re.findall(r"#\s{3,}(\S.*)", block)}
        pins[canonicalize_name(head.group(1))] = (head.group(2), "--hash=sha256:" in block, vias)
    return pins


def mismatches(pyproject: str, lock: str) -> list[str]:
    wants, pins = declared(pyproject), locked(lock)
    problems = []
    for name, req in wants.items():
        if name not in pins:
            problems.append(f"{name}: in pyproject.toml, not in the lock")
        elif not req.specifier.contains(pins[name][0], prereleases=True):
            problems.append(f"{name}: pyproject.toml wants {req.specifier}, the lock pins {pins[name][0]}")
    for name, (_, _, vias) in pins.items():
        if PROJECT in vias and name not in wants:
            problems.append(f"{name}: the lock has it for pyproject.toml, which no longer asks for it")
    problems += [f"{name}: pinned without a hash" for name, (_, hashed, _) in pins.items() if not hashed]
    return problems


def test_the_lock_agrees_with_pyproject() -> None:
    problems = mismatches((ROOT / "pyproject.toml").read_text(), (ROOT / "requirements.lock").read_text())
    assert problems == [], "run `make lock`: " + "; ".join(problems)


def test_a_disagreement_is_found() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    lock = (ROOT / "requirements.lock").read_text()
    added = pyproject.replace('"numpy",', '"numpy",\n    "left-pad-not-locked>=1",')
    assert mismatches(added, lock) == ["left-pad-not-locked: in pyproject.toml, not in the lock"]
    torch_pin = re.search(r"^torch==(\S+)", lock, re.M)
    assert torch_pin
    moved = lock.replace(f"torch=={torch_pin.group(1)}", "torch==2.0.0", 1)
    assert mismatches(pyproject, moved) == ["torch: pyproject.toml wants ==2.14.1, the lock pins 2.0.0"]
    dropped = pyproject.replace('    "tqdm",\n', "")
    assert mismatches(dropped, lock) == ["tqdm: the lock has it for pyproject.toml, which no longer asks for it"]
