"""What the registry stores and checks: keys, ids, events, and the weights-to-record binding."""

from __future__ import annotations

import datetime as dt
import getpass
import re
import socket
import subprocess
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protein.errors import RegistryError
from protein.storage.base import sha256_file

MODEL_FORMAT = "protein-model/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
CHAMPION_KEY = "registry/champion.json"
RUN_INDEX_PREFIX = "registry/runs/"
PROBE_PREFIX = "probes/"
# fullmatch, never match with '$': '$' also matches before a trailing newline.
VERSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SPEC_FETCH_WORKERS = 16
DAY_S = 24 * 3600.0


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def code_version() -> str | None:
    """The git commit of the code that trained a model, when it runs from a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def default_actor() -> str:
    """Who acts when the caller does not say: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname() or 'unknown-host'}"


def new_event_id() -> str:
    return uuid.uuid4().hex


def check_version_id(version: str) -> str:
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version) or ".." in version:
        raise RegistryError(f"invalid model version {version!r} (expected letters, digits, '.', '_' or '-')")
    return version


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not VERSION_ID.fullmatch(run_id) or ".." in run_id:
        raise RegistryError(f"invalid run id {run_id!r} (expected letters, digits, '.', '_' or '-')")
    return run_id


def version_prefix(version: str) -> str:
    return f"models/{check_version_id(version)}/"


def run_index_key(run_id: str) -> str:
    return f"{RUN_INDEX_PREFIX}{check_run_id(run_id)}.json"


def weights_mismatch(version: str, spec: dict[str, Any], size: int, sha256: str | None) -> str | None:
    """What differs between the weights found and the ones model.json was registered with, or None."""
    expected_size = spec.get("weights_size")
    if expected_size is not None and int(expected_size) != size:
        return f"size {size} bytes, model.json says {expected_size}"
    expected = spec.get("weights_sha256")
    if expected is None:
        return "model.json records no weights_sha256"
    if sha256 is not None and sha256.lower() != expected.lower():
        return f"sha256 {sha256[:16]}.., model.json says {expected[:16]}.."
    return None


def check_local_weights(model_dir: Path, spec: dict[str, Any]) -> None:
    """Refuse a downloaded version folder whose weights are not the ones its model.json names."""
    weights = Path(model_dir) / WEIGHTS_FILE
    try:
        size, digest = weights.stat().st_size, sha256_file(weights)
    except OSError:
        raise RegistryError(f"model version {spec.get('id')}: weights missing at {weights}") from None
    if problem := weights_mismatch(str(spec.get("id")), spec, size, digest):
        raise RegistryError(f"model version {spec.get('id')}: weights at {weights} refused ({problem})")


def promotion_stack(history: Iterable[dict[str, Any]]) -> list[str]:
    """The champions in serving order: each promote pushes, each rollback pops. Rolling back walks
    down this stack (promote A, B, C; rollback -> B; rollback -> A), never flips between two."""
    stack: list[str] = []
    for event in history:
        if event.get("action") == "promote":
            stack.append(event["model_id"])
        elif event.get("action") == "rollback" and stack:
            stack.pop()
    return stack


@dataclass(frozen=True)
class ChampionState:
    champion: str | None
    history: list[dict[str, Any]]
    etag: str | None  # None: no champion.json yet

    def has_event(self, event_id: str) -> bool:
        return any(e.get("event_id") == event_id for e in self.history)
