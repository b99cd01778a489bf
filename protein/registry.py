"""Model registry over an object store.

Layout (all keys relative to the store root):
    models/<version>/model.safetensors   weights, no pickle
    models/<version>/model.json          everything needed to rebuild and judge the model;
                                         written last, so its presence marks a complete version
    registry/champion.json               {"champion": <version>|null, "history": [...events]}

A version is immutable (written with if-none-match). Promotion and rollback only rewrite
champion.json, by compare-and-swap on its etag, so concurrent promotions form one consistent
line of history: the loser gets PromotionConflict and nothing changes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protein.errors import NotFound, PreconditionFailed, PromotionConflict, RegistryError
from protein.storage import Store

log = logging.getLogger(__name__)

MODEL_FORMAT = "protein-model/1"
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
CHAMPION_KEY = "registry/champion.json"
VERSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


def check_version_id(version: str) -> str:
    if not isinstance(version, str) or not VERSION_ID.match(version) or ".." in version:
        raise RegistryError(f"invalid model version {version!r} (expected letters, digits, '.', '_' or '-')")
    return version


def version_prefix(version: str) -> str:
    return f"models/{check_version_id(version)}/"


@dataclass(frozen=True)
class ChampionState:
    champion: str | None
    history: list[dict[str, Any]]
    etag: str | None  # None: no champion.json yet


class Registry:
    def __init__(self, store: Store) -> None:
        self.store = store

    # --- versions ---------------------------------------------------------------------------
    def register(self, weights_path: Path, spec: dict[str, Any], version: str | None = None) -> str:
        """Upload weights then model.json; returns the new version id."""
        digest = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()
        now = dt.datetime.now(dt.UTC)
        version = check_version_id(version or f"{now:%Y%m%d-%H%M%S}-{spec['arch']}-{digest[:8]}")
        prefix = version_prefix(version)
        if self.store.exists(prefix + SPEC_FILE):
            raise RegistryError(f"model version {version} already exists; versions are immutable")
        full_spec = {
            "format": MODEL_FORMAT,
            "id": version,
            "created": utc_now(),
            "weights_sha256": digest,
            "code_version": code_version(),
            **spec,
        }
        self.store.put_file(prefix + WEIGHTS_FILE, Path(weights_path))
        try:
            self.store.put_bytes(prefix + SPEC_FILE, json.dumps(full_spec, indent=2).encode(), if_none_match=True)
        except PreconditionFailed:
            raise RegistryError(f"model version {version} already exists; versions are immutable") from None
        log.info("registered model version %s", version)
        return version

    def versions(self) -> list[str]:
        """Complete versions (those with a model.json), oldest first."""
        found = [k.split("/")[1] for k in self.store.list("models/") if k.endswith("/" + SPEC_FILE)]
        return sorted(found)

    def spec(self, version: str) -> dict[str, Any]:
        # One GET: a missing model.json is reported as an unknown version, no exists() first.
        version = self.resolve(version) if version == "champion" else check_version_id(version)
        try:
            return json.loads(self.store.get_bytes(version_prefix(version) + SPEC_FILE))
        except NotFound:
            raise self._unknown(version) from None

    def _unknown(self, version: str) -> RegistryError:
        existing = self.versions()
        listing = ", ".join(existing[-10:]) if existing else "none"
        return RegistryError(f"unknown model version {version!r} in {self.store.uri} (versions: {listing})")

    def resolve(self, version: str) -> str:
        """'champion' -> the champion's id; anything else must name an existing version."""
        if version == "champion":
            champion = self.champion().champion
            if champion is None:
                raise RegistryError(f"{self.store.uri} has no champion yet (promote a version first)")
            return champion
        check_version_id(version)
        if not self.store.exists(version_prefix(version) + SPEC_FILE):
            raise self._unknown(version)
        return version

    def download(self, version: str, cache_root: Path | None = None) -> Path:
        """Fetch a version's files into a local folder (checksums verified by the store)."""
        version = self.resolve(version)
        root = Path(cache_root) if cache_root else Path(tempfile.mkdtemp(prefix="protein-model-"))
        target = root / version
        for name in (WEIGHTS_FILE, SPEC_FILE):
            self.store.get_file(version_prefix(version) + name, target / name)
        return target

    # --- champion ---------------------------------------------------------------------------
    def champion(self) -> ChampionState:
        etag = self.store.etag(CHAMPION_KEY)
        if etag is None:
            return ChampionState(None, [], None)
        # The etag is read before the bytes: if a write lands in between, the bytes are newer
        # than the etag and our compare-and-swap fails safe (a spurious conflict, never a
        # lost update).
        doc = json.loads(self.store.get_bytes(CHAMPION_KEY))
        return ChampionState(doc.get("champion"), doc.get("history", []), etag)

    def _swap(self, expected: ChampionState, champion: str | None, event: dict[str, Any]) -> ChampionState:
        doc = {"champion": champion, "history": [*expected.history, event]}
        data = json.dumps(doc, indent=2).encode()
        try:
            if expected.etag is None:
                etag = self.store.put_bytes(CHAMPION_KEY, data, if_none_match=True)
            else:
                etag = self.store.put_bytes(CHAMPION_KEY, data, if_match=expected.etag)
        except PreconditionFailed:
            now = self.champion().champion
            raise PromotionConflict(
                f"champion changed during promotion: expected {expected.champion or 'none'}, now {now or 'none'}; "
                "nothing was changed (re-evaluate against the new champion and retry)"
            ) from None
        return ChampionState(champion, doc["history"], etag)

    def promote(self, version: str, expected_champion: str | None | type = ..., reason: str = "") -> ChampionState:
        """Make `version` the champion if the champion is still `expected_champion`.

        With expected_champion omitted, the current champion is read and expected (a manual
        promotion); a flow passes the champion it evaluated against.
        """
        version = self.resolve(version)
        state = self.champion()
        if expected_champion is not ... and state.champion != expected_champion:
            raise PromotionConflict(
                f"champion is {state.champion or 'none'}, expected {expected_champion or 'none'}; "
                "another promotion happened in between, nothing was changed"
            )
        event = {"action": "promote", "model_id": version, "previous": state.champion, "at": utc_now(),
                 "reason": reason}
        new = self._swap(state, version, event)
        log.info("promoted %s (previous champion: %s)", version, state.champion)
        return new

    def rollback(self, reason: str = "") -> ChampionState:
        """Make the previous champion the champion again."""
        state = self.champion()
        if state.champion is None:
            raise RegistryError(f"{self.store.uri} has no champion to roll back")
        previous = None
        for event in reversed(state.history):
            if event.get("model_id") == state.champion:
                previous = event.get("previous")
                break
        if previous is None:
            raise RegistryError(f"champion {state.champion} has no previous champion to roll back to")
        event = {"action": "rollback", "model_id": previous, "previous": state.champion, "at": utc_now(),
                 "reason": reason}
        return self._swap(state, previous, event)

    def listing(self) -> list[dict[str, Any]]:
        champion = self.champion().champion
        rows = []
        for version in self.versions():
            spec = self.spec(version)
            rows.append({
                "id": version,
                "created": spec.get("created"),
                "champion": version == champion,
                "arch": spec.get("arch"),
                "image_size": spec.get("image_size"),
                "data_fingerprint": spec.get("data_fingerprint"),
                "metrics": spec.get("metrics", {}),
            })
        return rows

    def orphans(self) -> list[str]:
        """Version folders with no model.json (an interrupted registration)."""
        prefixes = {k.split("/")[1] for k in self.store.list("models/")}
        return sorted(prefixes - set(self.versions()))

    def delete_orphan(self, version: str) -> int:
        """Remove an incomplete version's objects; refuses complete versions."""
        if version in self.versions():
            raise RegistryError(f"model version {version} is complete; only incomplete versions are removed")
        return self.store.delete_prefix(version_prefix(version))

    def find_by_run(self, run_id: str) -> str | None:
        """The version a training run registered (newest if several), or None."""
        found = [v for v in self.versions() if self.spec(v).get("run_id") == run_id]
        return found[-1] if found else None

    def import_version(self, source: Registry, version: str) -> str:
        """Copy a complete version from another store (e.g. a dev folder to production S3),
        byte for byte; the copy keeps its id and is verified on the way."""
        version = source.resolve(version)
        prefix = version_prefix(version)
        if self.store.exists(prefix + SPEC_FILE):
            raise RegistryError(f"model version {version} already exists in {self.store.uri}")
        with tempfile.TemporaryDirectory(prefix="protein-import-") as tmp:
            local = source.download(version, Path(tmp))
            self.store.put_file(prefix + WEIGHTS_FILE, local / WEIGHTS_FILE)
            self.store.put_bytes(prefix + SPEC_FILE, (local / SPEC_FILE).read_bytes(), if_none_match=True)
        return version
