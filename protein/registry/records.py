"""What the registry stores and checks: keys, ids, events, and the weights-to-record binding."""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
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
from protein.storage.records import RecordSchema

MODEL_FORMAT = "protein-model/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
CHAMPION_KEY = "registry/champion.json"
RUN_INDEX_PREFIX = "registry/runs/"
# Both live under registry/runs/ because that is where the trainer (claims) and the operator (tombstones)
# already may create objects only if absent (deployments/iam/): no role gains a write it did not have.
CLAIM_PREFIX = f"{RUN_INDEX_PREFIX}claims/"
TOMBSTONE_PREFIX = f"{RUN_INDEX_PREFIX}tombstones/"
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


def flow_training_run_id(data_fingerprint: str, flow_run_id: str | uuid.UUID) -> str:
    """The training run id of a retrain flow run: the same on every attempt of that flow run (a retry
    resumes its checkpoint), different for every other flow run. Its tail is the random end of the
    flow run's id: Prefect's ids are UUIDv7, whose first 8 hex digits are a millisecond clock that
    moves every 65 s, so with them runs started within a minute of each other on the same data
    shared a run id, and the later one returned the earlier one's model."""
    return check_run_id(f"{data_fingerprint[:8]}-{uuid.UUID(str(flow_run_id)).hex[-12:]}")


def version_prefix(version: str) -> str:
    return f"models/{check_version_id(version)}/"


def run_index_key(run_id: str) -> str:
    return f"{RUN_INDEX_PREFIX}{check_run_id(run_id)}.json"


def claim_key(run_id: str) -> str:
    return f"{CLAIM_PREFIX}{check_run_id(run_id)}.json"


def tombstone_key(version: str) -> str:
    return f"{TOMBSTONE_PREFIX}{check_version_id(version)}.json"


def gate_record_key(version: str) -> str:
    """The gate's decision on ``version`` (both evaluations, the rows), written by the gate."""
    return f"gates/{check_version_id(version)}.json"


def report_prefix(version: str) -> str:
    """The gate's reports on ``version`` (training.png)."""
    return f"reports/{check_version_id(version)}/"


_TEXT_OR_NULL = (str, type(None))
MODEL_RECORD = RecordSchema(
    "model record",
    required={"id": str, "arch": str, "image_size": int, "weights_sha256": str, "weights_size": int},
    optional={"format": str, "created": str, "run_id": _TEXT_OR_NULL, "metrics": dict, "event": dict,
              "class_names": list, "thresholds": list, "holdout": (dict, type(None)),
              "data_fingerprint": _TEXT_OR_NULL, "label_profile": (dict, type(None)), "train_config": dict},
)
CHAMPION_EVENT = RecordSchema(
    "champion history event",
    # model_id is null only for a rollback (or an undone promotion) back to no champion at all.
    required={"action": str, "model_id": _TEXT_OR_NULL},
    optional={"event_id": str, "previous": _TEXT_OR_NULL, "at": str, "actor": _TEXT_OR_NULL,
              "reason": _TEXT_OR_NULL, "weights_sha256": str, "spec_sha256": str},
)
CHAMPION_RECORD = RecordSchema(
    "champion pointer", required={"champion": _TEXT_OR_NULL, "history": list}, items={"history": CHAMPION_EVENT},
)
RUN_INDEX_RECORD = RecordSchema("run index entry", required={"model_id": str}, optional={"run_id": str,
                                                                                         "event_id": str})
CLAIM_RECORD = RecordSchema("run registration claim", required={"run_id": str, "model_id": str},
                            optional={"at": str, "actor": str})
TOMBSTONE_RECORD = RecordSchema("version tombstone", required={"model_id": str},
                                optional={"deleted_at": str, "actor": str, "run_id": _TEXT_OR_NULL})


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


def newest_promotion(history: Iterable[dict[str, Any]], version: str) -> dict[str, Any] | None:
    """The newest promote event that made ``version`` the champion (None: it never served)."""
    for event in reversed(list(history)):
        if event.get("action") == "promote" and event.get("model_id") == version:
            return event
    return None


def pinned_hashes(history: Iterable[dict[str, Any]], version: str) -> tuple[str, str] | None:
    """(weights SHA-256, model.json SHA-256) the newest event that made ``version`` the champion
    recorded, or None if none did (a version never served, or promoted before events were pinned)."""
    for event in reversed(list(history)):
        if event.get("model_id") == version and event.get("action") in ("promote", "rollback"):
            if event.get("weights_sha256") and event.get("spec_sha256"):
                return str(event["weights_sha256"]), str(event["spec_sha256"])
            return None
    return None


def spec_digest(spec_bytes: bytes) -> str:
    """What promotion events pin a model.json by: the SHA-256 of its exact bytes."""
    return hashlib.sha256(spec_bytes).hexdigest()


@dataclass(frozen=True)
class ChampionState:
    champion: str | None
    history: list[dict[str, Any]]
    etag: str | None  # None: no champion.json yet

    def has_event(self, event_id: str) -> bool:
        return any(e.get("event_id") == event_id for e in self.history)


def resolve_champion_name(version: str, state: ChampionState, store_uri: str) -> str:
    """'champion' -> the champion's id (RegistryError if there is none); any other id, checked."""
    if version == "champion":
        if state.champion is None:
            raise RegistryError(f"{store_uri} has no champion yet (promote a version first)")
        return state.champion
    return check_version_id(version)
