"""`Registry`: register, resolve, download, promote and roll back model versions."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from protein.atomic import write_bytes_atomic
from protein.errors import IntegrityError, NotFound, PreconditionFailed, PromotionConflict, RegistryError
from protein.registry.records import (
    CHAMPION_KEY,
    MODEL_FORMAT,
    SPEC_FETCH_WORKERS,
    SPEC_FILE,
    WEIGHTS_FILE,
    ChampionState,
    check_run_id,
    check_version_id,
    code_version,
    default_actor,
    new_event_id,
    promotion_stack,
    run_index_key,
    utc_now,
    version_prefix,
    weights_mismatch,
)
from protein.registry.retention import RetentionMixin
from protein.storage import Store
from protein.storage.base import sha256_file

log = logging.getLogger("protein.registry")


class Registry(RetentionMixin):
    def __init__(self, store: Store, actor: str | None = None) -> None:
        self.store = store
        self.actor = actor or default_actor()

    def _event(self, action: str, model_id: str | None, previous: str | None, reason: str,
               event_id: str | None, actor: str | None) -> dict[str, Any]:
        return {"event_id": event_id or new_event_id(), "action": action, "model_id": model_id,
                "previous": previous, "at": utc_now(), "actor": actor or self.actor, "reason": reason}

    # --- versions ---------------------------------------------------------------------------
    def register(self, weights_path: Path, spec: dict[str, Any], version: str | None = None,
                 event_id: str | None = None, actor: str | None = None) -> str:
        """Upload weights then model.json then the run index, each create-only; returns the version id.

        A retry whose earlier attempt landed (same ``event_id``) returns the same version."""
        weights_path = Path(weights_path)
        digest, size = sha256_file(weights_path), weights_path.stat().st_size
        now = dt.datetime.now(dt.UTC)
        version = check_version_id(version or f"{now:%Y%m%d-%H%M%S}-{spec['arch']}-{digest[:8]}")
        prefix = version_prefix(version)
        event = self._event("register", version, None, "", event_id, actor)
        run_id = spec.get("run_id")
        if run_id is not None:
            check_run_id(run_id)
        full_spec = {
            "format": MODEL_FORMAT,
            "id": version,
            "created": event["at"],
            "weights_sha256": digest,
            "weights_size": size,
            "code_version": code_version(),
            **spec,
            "event": event,
        }
        try:
            self.store.put_file(prefix + WEIGHTS_FILE, weights_path, if_none_match=True)
        except PreconditionFailed:
            # Our own earlier attempt (or an interrupted registration of these very bytes) is fine;
            # anything else would replace the bytes a version id stands for.
            found = self.store.recorded_sha256(prefix + WEIGHTS_FILE)
            if found is None or found[0] != size or found[1] != digest:
                raise RegistryError(
                    f"model version {version} already has different weights in {self.store.uri}; versions are "
                    "immutable"
                ) from None
        try:
            self.store.put_bytes(prefix + SPEC_FILE, json.dumps(full_spec, indent=2).encode(), if_none_match=True)
        except PreconditionFailed:
            existing = self._read_spec(version)
            if existing.get("event", {}).get("event_id") != event["event_id"]:
                raise RegistryError(f"model version {version} already exists; versions are immutable") from None
            log.info("model version %s was already registered by this request (retry)", version)
        if run_id is not None:
            self._index_run(run_id, version, event["event_id"])
        log.info("registered model version %s", version)
        return version

    def _index_run(self, run_id: str, version: str, event_id: str) -> None:
        doc = {"run_id": run_id, "model_id": version, "event_id": event_id}
        try:
            self.store.put_bytes(run_index_key(run_id), json.dumps(doc).encode(), if_none_match=True)
        except PreconditionFailed:
            first = self.find_by_run(run_id)
            if first != version:
                log.warning("run %s already registered %s; the index keeps that one, not %s", run_id, first, version)

    def versions(self) -> list[str]:
        """Complete versions (those with a model.json), sorted by id."""
        found = [k.split("/")[1] for k in self.store.list("models/") if k.endswith("/" + SPEC_FILE)]
        return sorted(found)

    def _read_spec(self, version: str) -> dict[str, Any]:
        try:
            return json.loads(self.store.get_bytes(version_prefix(version) + SPEC_FILE))
        except NotFound:
            raise self._unknown(version) from None

    def spec(self, version: str) -> dict[str, Any]:
        # One GET: a missing model.json is reported as an unknown version, no exists() first.
        version = self.resolve(version) if version == "champion" else check_version_id(version)
        return self._read_spec(version)

    def specs(self, versions: list[str]) -> dict[str, dict[str, Any]]:
        """Many model.json at once, fetched concurrently (each is one small GET)."""
        if not versions:
            return {}
        with concurrent.futures.ThreadPoolExecutor(min(SPEC_FETCH_WORKERS, len(versions))) as pool:
            return dict(zip(versions, pool.map(self._read_spec, versions), strict=True))

    def _unknown(self, version: str) -> RegistryError:
        existing = self.versions()
        listing = ", ".join(existing[-10:]) if existing else "none"
        return RegistryError(f"unknown model version {version!r} in {self.store.uri} (versions: {listing})")

    def require_intact(self, version: str) -> dict[str, Any]:
        """model.json, after checking the weights object exists with the size and recorded hash it names."""
        spec = self._read_spec(check_version_id(version))
        found = self.store.recorded_sha256(version_prefix(version) + WEIGHTS_FILE)
        if found is None:
            raise RegistryError(f"model version {version}: weights object missing from {self.store.uri} "
                                "(deleted or never finished uploading); it cannot serve")
        size, recorded = found
        # Every write by this module records the hash: an object without one was rewritten by something else.
        problem = weights_mismatch(version, spec, size, recorded) or (
            None if recorded else "no sha256 recorded on the object: rewritten outside protein?")
        if problem:
            raise RegistryError(f"model version {version}: weights object in {self.store.uri} refused ({problem})")
        return spec

    def resolve(self, version: str) -> str:
        """'champion' -> the champion's id; anything else must name a complete, intact version."""
        if version == "champion":
            champion = self.champion().champion
            if champion is None:
                raise RegistryError(f"{self.store.uri} has no champion yet (promote a version first)")
            version = champion
        self.require_intact(check_version_id(version))
        return version

    def download(self, version: str, cache_root: Path) -> Path:
        """Fetch a version's files into cache_root/<version>/; the weights must match model.json.
        The caller owns cache_root (a cache with a size bound, or a temporary folder it removes)."""
        version = self.resolve(version)
        target = Path(cache_root) / version
        spec_bytes = self.store.get_bytes(version_prefix(version) + SPEC_FILE)
        spec = json.loads(spec_bytes)
        weights = target / WEIGHTS_FILE
        try:
            digest = self.store.get_file(version_prefix(version) + WEIGHTS_FILE, weights)
        except NotFound:
            raise RegistryError(f"model version {version}: weights object missing from {self.store.uri}") from None
        except IntegrityError as exc:
            raise RegistryError(f"model version {version}: weights refused ({exc})") from None
        problem = weights_mismatch(version, spec, weights.stat().st_size, digest)
        if problem:
            weights.unlink(missing_ok=True)
            raise RegistryError(f"model version {version}: weights in {self.store.uri} refused ({problem})")
        # model.json last, atomically: a folder with a model.json holds the matching weights.
        write_bytes_atomic(target / SPEC_FILE, spec_bytes)
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
            now = self.champion()
            if now.has_event(event["event_id"]):
                # Our write landed and only its answer was lost (the client retried into its own
                # new etag): that is success, not a conflict.
                log.info("%s %s had already landed (retried request)", event["action"], event["model_id"])
                return now
            raise PromotionConflict(
                f"champion changed during {event['action']}: expected {expected.champion or 'none'}, now "
                f"{now.champion or 'none'}; nothing was changed (re-evaluate against the new champion and retry)"
            ) from None
        return ChampionState(champion, doc["history"], etag)

    def promote(self, version: str, expected_champion: str | None | type = ..., reason: str = "",
                event_id: str | None = None, actor: str | None = None) -> ChampionState:
        """Make `version` the champion if the champion is still `expected_champion`.

        With expected_champion omitted, the current champion is read and expected (a manual
        promotion); a flow passes the champion it evaluated against. A retry with the same
        ``event_id`` after the promotion landed returns the current state instead of a conflict.
        """
        state = self.champion()
        if event_id is not None and state.has_event(event_id):
            log.info("promotion %s already landed (retried request)", event_id)
            return state
        version = self.resolve(version)
        if expected_champion is not ... and state.champion != expected_champion:
            raise PromotionConflict(
                f"champion is {state.champion or 'none'}, expected {expected_champion or 'none'}; "
                "another promotion happened in between, nothing was changed"
            )
        event = self._event("promote", version, state.champion, reason, event_id, actor)
        new = self._swap(state, version, event)
        log.info("promoted %s (previous champion: %s)", version, state.champion)
        return new

    def rollback(self, reason: str = "", event_id: str | None = None, actor: str | None = None) -> ChampionState:
        """Make the champion before the current one the champion again (one step down the stack)."""
        state = self.champion()
        if event_id is not None and state.has_event(event_id):
            return state
        if state.champion is None:
            raise RegistryError(f"{self.store.uri} has no champion to roll back")
        stack = promotion_stack(state.history)
        if len(stack) < 2:
            raise RegistryError(f"champion {state.champion} has no previous champion to roll back to")
        target = stack[-2]
        self.require_intact(target)
        event = self._event("rollback", target, state.champion, reason, event_id, actor)
        new = self._swap(state, target, event)
        log.info("rolled back from %s to %s", state.champion, target)
        return new

    def history(self, registrations: bool = False) -> list[dict[str, Any]]:
        """Champion events, oldest first; with ``registrations``, each version's register event too."""
        events = list(self.champion().history)
        if registrations:
            for version, spec in self.specs(self.versions()).items():
                events.append(spec.get("event") or {"action": "register", "model_id": version,
                                                    "at": spec.get("created")})
        return sorted(events, key=lambda e: str(e.get("at") or ""))

    def listing(self) -> list[dict[str, Any]]:
        champion = self.champion().champion
        rows = []
        for version, spec in self.specs(self.versions()).items():
            rows.append({
                "id": version,
                "created": spec.get("created"),
                "champion": version == champion,
                "arch": spec.get("arch"),
                "image_size": spec.get("image_size"),
                "data_fingerprint": spec.get("data_fingerprint"),
                "run_id": spec.get("run_id"),
                "metrics": spec.get("metrics", {}),
            })
        return rows

    def find_by_run(self, run_id: str) -> str | None:
        """The version a training run registered, or None: one GET of the run index."""
        try:
            doc = json.loads(self.store.get_bytes(run_index_key(run_id)))
        except NotFound:
            return None
        return check_version_id(doc["model_id"])

    def reindex_runs(self) -> dict[str, str]:
        """Write the run index for versions registered before it existed (oldest registration wins)."""
        added: dict[str, str] = {}
        for version, spec in sorted(self.specs(self.versions()).items(), key=lambda kv: str(kv[1].get("created"))):
            run_id = spec.get("run_id")
            if run_id and run_id not in added and self.find_by_run(run_id) is None:
                self._index_run(run_id, version, (spec.get("event") or {}).get("event_id", "reindex"))
                added[run_id] = version
        return added

    def import_version(self, source: Registry, version: str) -> str:
        """Copy a complete version from another store (e.g. a dev folder to production S3),
        byte for byte; the copy keeps its id and is verified on the way."""
        version = source.resolve(version)
        prefix = version_prefix(version)
        if self.store.exists(prefix + SPEC_FILE):
            raise RegistryError(f"model version {version} already exists in {self.store.uri}")
        with tempfile.TemporaryDirectory(prefix="protein-import-") as tmp:
            local = source.download(version, Path(tmp))
            try:
                self.store.put_file(prefix + WEIGHTS_FILE, local / WEIGHTS_FILE, if_none_match=True)
                spec_bytes = (local / SPEC_FILE).read_bytes()
                self.store.put_bytes(prefix + SPEC_FILE, spec_bytes, if_none_match=True)
            except PreconditionFailed:
                raise RegistryError(f"model version {version} already exists in {self.store.uri}") from None
        spec = json.loads(spec_bytes)
        if spec.get("run_id"):
            self._index_run(spec["run_id"], version, (spec.get("event") or {}).get("event_id", "import"))
        return version
