"""`Registry`: register, resolve, download and list model versions (the champion: `champion`)."""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from protein.atomic import write_bytes_atomic
from protein.errors import IntegrityError, NotFound, PreconditionFailed, ProteinError, RegistryError
from protein.registry.champion import ChampionMixin
from protein.registry.records import (
    CLAIM_RECORD,
    MODEL_FORMAT,
    MODEL_RECORD,
    RUN_INDEX_RECORD,
    SPEC_FETCH_WORKERS,
    SPEC_FILE,
    WEIGHTS_FILE,
    check_run_id,
    check_version_id,
    claim_key,
    code_version,
    default_actor,
    resolve_champion_name,
    run_index_key,
    tombstone_key,
    version_prefix,
    weights_mismatch,
)
from protein.registry.retention import RetentionMixin
from protein.storage import LocalStore, Store
from protein.storage.base import sha256_file
from protein.storage.records import load_record, load_record_bytes, parse_record, record_location

log = logging.getLogger("protein.registry")


class Registry(ChampionMixin, RetentionMixin):
    def __init__(self, store: Store, actor: str | None = None) -> None:
        self.store = store
        self.actor = actor or default_actor()

    # --- versions ---------------------------------------------------------------------------
    def register(self, weights_path: Path, spec: dict[str, Any], version: str | None = None,
                 event_id: str | None = None, actor: str | None = None) -> str:
        """Upload weights then model.json then the run index, each create-only; returns the version id.

        Idempotent by run id: a run first claims a version id (``registry/runs/claims/<run>.json``,
        create-only), so a rerun after a crash anywhere in between registers under that same id, and
        a run whose model.json landed gets it back: one version per run. A retry whose earlier attempt
        landed (same ``event_id``) returns the same version. A deleted version id is never reused."""
        weights_path = Path(weights_path)
        digest, size = sha256_file(weights_path), weights_path.stat().st_size
        now = dt.datetime.now(dt.UTC)
        version = check_version_id(version or f"{now:%Y%m%d-%H%M%S}-{spec['arch']}-{digest[:8]}")
        run_id = spec.get("run_id")
        if run_id is not None:
            check_run_id(run_id)
            claimed = self._claim_run(run_id, version)
            if claimed != version:
                log.info("run %s claimed version %s in an earlier attempt; registering under that id", run_id,
                         claimed)
                version = claimed
            if self.store.exists(version_prefix(version) + SPEC_FILE):
                found = self._read_spec(version)
                if found.get("run_id") != run_id:
                    raise RegistryError(f"run {run_id} claimed model version {version}, which another run "
                                        f"({found.get('run_id')}) registered; refusing to mix them")
                log.info("run %s already registered %s (an earlier attempt); not registering again", run_id,
                         version)
                self._index_run(run_id, version, str((found.get("event") or {}).get("event_id", "claim")))
                return version
        self._refuse_tombstoned(version)
        prefix = version_prefix(version)
        event = self._event("register", version, None, "", event_id, actor)
        # What binds the record to its id and bytes comes last: a caller's spec (e.g. one copied from
        # another version's model.json) never overrides it.
        full_spec = {
            "code_version": code_version(),
            **spec,
            "format": MODEL_FORMAT,
            "id": version,
            "created": event["at"],
            "weights_sha256": digest,
            "weights_size": size,
            "event": event,
        }
        try:
            self.store.put_file(prefix + WEIGHTS_FILE, weights_path, if_none_match=True)
        except PreconditionFailed:
            # Our own earlier attempt (or an interrupted registration of these very bytes) is fine;
            # anything else would replace the bytes a version id stands for.
            found_weights = self.store.recorded_sha256(prefix + WEIGHTS_FILE)
            if found_weights is None or found_weights[0] != size or found_weights[1] != digest:
                raise RegistryError(
                    f"model version {version} already has different weights in {self.store.uri}; versions are "
                    "immutable (an interrupted attempt of this run left them: `protein models gc` removes them "
                    "once older than --older-than-hours, then rerun)"
                ) from None
        try:
            self.store.put_bytes(prefix + SPEC_FILE, json.dumps(full_spec, indent=2).encode(), if_none_match=True)
        except PreconditionFailed:
            existing = self._read_spec(version)
            same_request = (existing.get("event") or {}).get("event_id") == event["event_id"]
            if not same_request and not (run_id is not None and existing.get("run_id") == run_id):
                raise RegistryError(f"model version {version} already exists; versions are immutable") from None
            log.info("model version %s was already registered by this request (retry)", version)
        if self.store.recorded_sha256(prefix + WEIGHTS_FILE) is None:
            # An orphan collection that planned while this registration stalled removed the weights
            # before model.json landed: upload them again, so a complete version is always whole.
            log.warning("model version %s: weights were collected mid-registration; uploading them again", version)
            self.store.put_file(prefix + WEIGHTS_FILE, weights_path, if_none_match=True)
        if run_id is not None:
            self._index_run(run_id, version, event["event_id"])
        log.info("registered model version %s", version)
        return version

    def _claim_run(self, run_id: str, version: str) -> str:
        """The version id this run registers under: ``version``, unless an earlier attempt claimed one."""
        doc = {"run_id": run_id, "model_id": version, "at": dt.datetime.now(dt.UTC).isoformat(), "actor": self.actor}
        try:
            self.store.put_bytes(claim_key(run_id), json.dumps(doc).encode(), if_none_match=True)
            return version
        except PreconditionFailed:
            return check_version_id(load_record(self.store, claim_key(run_id), CLAIM_RECORD)["model_id"])

    def _refuse_tombstoned(self, version: str) -> None:
        if self.store.exists(tombstone_key(version)):
            raise RegistryError(f"model version {version} was deleted from {self.store.uri} "
                                f"({tombstone_key(version)}); a deleted version id is never registered or promoted "
                                "again")

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

    def _read_spec_bytes(self, version: str) -> tuple[dict[str, Any], bytes]:
        key = version_prefix(version) + SPEC_FILE
        try:
            spec, data = load_record_bytes(self.store, key, MODEL_RECORD)
        except NotFound:
            raise self._unknown(version) from None
        if spec["id"] != version:
            # A model.json copied from another version would bind this id to that version's weights.
            raise RegistryError(f"{record_location(self.store, key)}: records id {spec['id']!r}, not {version!r}")
        return spec, data

    def _read_spec(self, version: str) -> dict[str, Any]:
        return self._read_spec_bytes(version)[0]

    def spec(self, version: str) -> dict[str, Any]:
        # One GET: a missing model.json is reported as an unknown version, no exists() first.
        version = self.resolve(version) if version == "champion" else check_version_id(version)
        return self._read_spec(version)

    def _spec_or_problem(self, version: str) -> dict[str, Any] | ProteinError:
        try:
            return self._read_spec(version)
        except (RegistryError, ProteinError) as exc:  # RecordError, IntegrityError: one broken version
            return exc

    def specs(self, versions: list[str]) -> dict[str, dict[str, Any] | ProteinError]:
        """Many model.json at once, fetched concurrently (each is one small GET); a version whose
        record cannot be read maps to the error that says why, so one broken version hides no other."""
        if not versions:
            return {}
        with concurrent.futures.ThreadPoolExecutor(min(SPEC_FETCH_WORKERS, len(versions))) as pool:
            return dict(zip(versions, pool.map(self._spec_or_problem, versions), strict=True))

    def _unknown(self, version: str) -> RegistryError:
        existing = self.versions()
        listing = ", ".join(existing[-10:]) if existing else "none"
        return RegistryError(f"unknown model version {version!r} in {self.store.uri} (versions: {listing})")

    def require_intact(self, version: str, check_bytes: bool = False) -> tuple[dict[str, Any], bytes]:
        """(model.json, its exact bytes), after checking the weights object exists with the
        size and recorded hash it names; with ``check_bytes``, the bytes themselves are hashed too."""
        spec, data = self._read_spec_bytes(check_version_id(version))
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
        if check_bytes:
            # The recorded hash is metadata anyone who can write the object can rewrite with it; a
            # version about to serve is held to the hash of the bytes it will serve.
            key = version_prefix(version) + WEIGHTS_FILE
            where = record_location(self.store, key)
            try:
                digest = self._stored_sha256(key)
            except NotFound:
                raise RegistryError(f"model version {version}: weights {where} missing; it cannot serve") from None
            except IntegrityError as exc:  # the bytes differ from the hash recorded beside them
                detail = str(exc).removeprefix(f"{where}: ")
                raise RegistryError(f"model version {version}: weights {where} refused: the bytes do not match "
                                    f"their recorded sha256 ({detail})") from None
            if problem := weights_mismatch(version, spec, size, digest):
                raise RegistryError(f"model version {version}: weights {where} refused: the bytes do not match "
                                    f"model.json ({problem})")
        return spec, data

    def _stored_sha256(self, key: str) -> str:
        """SHA-256 of an object's bytes as stored now, read in full (not the hash recorded beside them)."""
        if isinstance(self.store, LocalStore):  # the file itself, no copy
            try:
                return sha256_file(self.store.root / key)
            except (FileNotFoundError, NotADirectoryError):
                raise NotFound(f"{self.store.uri}/{key}: not found") from None
        # Elsewhere one streamed GET into a scratch file, hashed as it lands (never held in memory).
        with tempfile.TemporaryDirectory(prefix="protein-verify-") as tmp:
            return self.store.get_file(key, Path(tmp) / WEIGHTS_FILE)

    def download(self, version: str, cache_root: Path | None = None) -> Path:
        """Fetch a version's files into a local folder; the weights must match model.json, and
        model.json the hash its promotion pinned (for a version that ever served)."""
        state = self.champion()
        version = resolve_champion_name(version, state, self.store.uri)
        # The very bytes that were checked against the pin are the ones written to the folder.
        spec, spec_bytes = self.verified(version, state)
        root = Path(cache_root) if cache_root else Path(tempfile.mkdtemp(prefix="protein-model-"))
        target = root / version
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

    def history(self, registrations: bool = False) -> list[dict[str, Any]]:
        """Champion events, oldest first; with ``registrations``, each version's register event too."""
        events = list(self.champion().history)
        if registrations:
            for version, spec in self.specs(self.versions()).items():
                if isinstance(spec, Exception):
                    events.append({"action": "register", "model_id": version, "broken": str(spec)})
                    continue
                events.append(spec.get("event") or {"action": "register", "model_id": version,
                                                    "at": spec.get("created")})
        return sorted(events, key=lambda e: str(e.get("at") or ""))

    def listing(self) -> list[dict[str, Any]]:
        """One row per version; a version whose model.json cannot be read is a row with ``broken``
        saying why, and the listing goes on."""
        champion = self.champion().champion
        rows = []
        for version, spec in self.specs(self.versions()).items():
            if isinstance(spec, Exception):
                rows.append({"id": version, "champion": version == champion, "broken": str(spec)})
                continue
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
            doc = load_record(self.store, run_index_key(run_id), RUN_INDEX_RECORD)
        except NotFound:
            return None
        return check_version_id(doc["model_id"])

    def reindex_runs(self) -> dict[str, str]:
        """Write the run index for versions registered before it existed (oldest registration wins)."""
        added: dict[str, str] = {}
        readable = {v: s for v, s in self.specs(self.versions()).items() if not isinstance(s, Exception)}
        for version, spec in sorted(readable.items(), key=lambda kv: str(kv[1].get("created"))):
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
        self._refuse_tombstoned(version)
        with tempfile.TemporaryDirectory(prefix="protein-import-") as tmp:
            local = source.download(version, Path(tmp))
            spec_bytes = (local / SPEC_FILE).read_bytes()
            spec = parse_record(spec_bytes, MODEL_RECORD, str(local / SPEC_FILE))
            try:
                self.store.put_file(prefix + WEIGHTS_FILE, local / WEIGHTS_FILE, if_none_match=True)
                self.store.put_bytes(prefix + SPEC_FILE, spec_bytes, if_none_match=True)
            except PreconditionFailed:
                raise RegistryError(f"model version {version} already exists in {self.store.uri}") from None
        if spec.get("run_id"):
            self._index_run(spec["run_id"], version, (spec.get("event") or {}).get("event_id", "import"))
        return version
