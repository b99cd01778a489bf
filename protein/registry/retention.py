"""Retention: what `protein models gc` may delete, and the rules that keep it from deleting anything live.

- Incomplete versions (no model.json) are collected only when every object is older than the
  threshold, and each is re-listed right before its delete: a registration that completed since
  the plan is left alone (and `Registry.register` re-uploads weights a collection raced away).
- `runs/<id>/` objects are collected only when the run was untouched for ``run_min_age_s`` (default
  `RUN_MIN_AGE_S`), has no registration in progress (a claim without its model.json), and never
  an object a complete version's model.json names (its ``holdout.probs_key``: ensembles and
  `--thresholds-from` read it). Each run is re-listed before its delete and skipped if it moved.
  A claim older than ``run_age_s`` whose version has no object at all is abandoned (the
  registration failed and nobody retried it): its run is collected like one that never registered,
  and the claim with it.
- A complete version is deleted only if it never served, and never behind a promotion's back: a
  tombstone is written first (create-only), the champion history is read again, then model.json and
  the weights go, and last the gate's record and reports on it. A promotion checks for the tombstone
  before its swap and again after it, and undoes its own swap if the tombstone appeared: either the
  delete or the promotion wins, never both.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from protein.errors import NotFound, PreconditionFailed, ProteinError, RegistryError
from protein.registry.records import (
    CLAIM_PREFIX,
    CLAIM_RECORD,
    DAY_S,
    PROBE_PREFIX,
    RUN_INDEX_PREFIX,
    SPEC_FILE,
    TOMBSTONE_PREFIX,
    ChampionState,
    check_version_id,
    claim_key,
    gate_record_key,
    report_prefix,
    run_index_key,
    tombstone_key,
    version_prefix,
)
from protein.storage import ObjectInfo, Store
from protein.storage.records import load_record

log = logging.getLogger("protein.registry")

# What gc --runs knows of a run claimed for registration but not in the run index.
ClaimState = Literal["in progress", "deleted", "abandoned", "unreadable"]

# No run touched within a day is collected, registered or not: a retrain resuming a run, or one whose
# registration is about to start, writes its checkpoint at least once per epoch.
RUN_MIN_AGE_S = 1 * DAY_S
# Interrupted uploads are aborted store-wide, so only once older than the longest upload in progress
# can be: a decoded training split pushed to the shared cache is tens of GB, on a slow link hours.
UPLOADS_MIN_AGE_S = 1 * DAY_S


@dataclass(frozen=True)
class GcPlan:
    """What `Registry.plan_gc` found; nothing is deleted until `Registry.apply_gc`."""

    orphans: dict[str, list[str]] = field(default_factory=dict)  # version -> its incomplete objects
    runs: dict[str, list[str]] = field(default_factory=dict)  # run id -> its collectable objects
    claims: dict[str, str] = field(default_factory=dict)  # run id -> version of its abandoned claim
    versions: list[str] = field(default_factory=list)  # complete versions past --keep-last
    probes: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # run id or key -> why it is kept
    older_than_s: float = 0.0
    run_min_age_s: float = RUN_MIN_AGE_S


def check_age(option: str, seconds: float, unit_s: float) -> None:
    """ValueError naming ``option`` (in its own unit) unless ``seconds`` is a finite age >= 0."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{option} must be a finite number >= 0, got {seconds / unit_s:g}")


class RetentionMixin:
    """Garbage collection for `Registry` (which supplies ``store``, ``actor``, ``champion``,
    ``find_by_run``, ``specs`` and ``_read_spec``)."""

    store: Store
    actor: str

    def champion(self) -> ChampionState:  # supplied by Registry
        raise NotImplementedError

    def specs(self, versions: list[str]) -> dict[str, dict[str, Any] | ProteinError]:  # supplied by Registry
        raise NotImplementedError

    def versions(self) -> list[str]:  # supplied by Registry
        raise NotImplementedError

    def find_by_run(self, run_id: str) -> str | None:  # supplied by Registry
        raise NotImplementedError

    def _read_spec(self, version: str) -> dict[str, Any]:  # supplied by Registry
        raise NotImplementedError

    def orphans(self, older_than_s: float = 0.0) -> list[str]:
        """Version folders with no model.json (an interrupted registration) whose newest object is
        older than ``older_than_s``: a registration in progress is younger and left alone."""
        return sorted(self._orphan_objects(older_than_s))

    def _orphan_objects(self, older_than_s: float, version: str | None = None,
                        now: float | None = None) -> dict[str, list[str]]:
        """``now``: the store's clock, read before the listing (read after it when not given)."""
        by_version: dict[str, list[ObjectInfo]] = {}
        for info in self.store.list_info(version_prefix(version) if version else "models/"):
            by_version.setdefault(info.key.split("/")[1], []).append(info)
        # LastModified is the store's clock, not this host's.
        cutoff = (self.store.clock() if now is None else now) - older_than_s
        return {
            name: [i.key for i in infos]
            for name, infos in by_version.items()
            if not any(i.key.endswith("/" + SPEC_FILE) for i in infos) and max(i.modified for i in infos) <= cutoff
        }

    def delete_orphan(self, version: str, older_than_s: float = 0.0) -> int:
        """Remove an incomplete version's own objects (not a whole prefix), as listed now; refuses
        complete versions."""
        check_version_id(version)
        objects = self._orphan_objects(older_than_s, version).get(version)
        if objects is None:
            if self.store.exists(version_prefix(version) + SPEC_FILE):
                raise RegistryError(f"model version {version} is complete; only incomplete versions are removed")
            return 0
        return self.store.delete_keys(objects)

    def protected_versions(self, state: ChampionState | None = None) -> set[str]:
        """The champion and every version that ever served or was replaced: rollback may need them."""
        state = state or self.champion()
        kept = {e.get("model_id") for e in state.history} | {e.get("previous") for e in state.history}
        return {v for v in kept | {state.champion} if v}

    def protected_keys(self) -> set[str]:
        """Every object a complete version's model.json names outside its own folder (today: the
        holdout probabilities under runs/<id>/). RecordError if a model.json cannot be read: what it
        names is then unknown, and nothing under runs/ may go."""
        keys: set[str] = set()
        for version, spec in self.specs(self.versions()).items():
            if isinstance(spec, Exception):
                raise RegistryError(f"gc --runs refused: model version {version} cannot be read, so what it "
                                    f"names is unknown ({spec}); delete or repair it first")
            probs_key = (spec.get("holdout") or {}).get("probs_key")
            if isinstance(probs_key, str):
                keys.add(probs_key)
        return keys

    def _claims_of_unindexed_runs(self, index: list[ObjectInfo], registered: set[str], run_age_s: float,
                                  now: float) -> dict[str, tuple[ClaimState, str | None]]:
        """Each run claimed for registration but not indexed, with the version it claimed: "deleted"
        when that version was deleted (tombstoned: `delete_version` removes the run's index entry, and
        the claim stays so that a retry of the run never registers the deleted id again),
        "abandoned" when the claim is older than ``run_age_s`` and its version has no object at all,
        "in progress" otherwise, or "unreadable"."""
        tombstoned = {i.key[len(TOMBSTONE_PREFIX):-len(".json")] for i in index
                      if i.key.startswith(TOMBSTONE_PREFIX)}
        claims: dict[str, tuple[ClaimState, str | None]] = {}
        for info in index:
            key = info.key
            run = key[len(CLAIM_PREFIX):-len(".json")]
            if not key.startswith(CLAIM_PREFIX) or not key.endswith(".json") or run in registered:
                continue
            try:
                version = check_version_id(load_record(self.store, key, CLAIM_RECORD)["model_id"])
            except ProteinError as exc:
                log.warning("registration claim %s cannot be read: %s", key, exc)
                claims[run] = ("unreadable", None)
                continue
            if version in tombstoned:
                claims[run] = ("deleted", version)
            # A failed registration nobody retried (the next retrain gets a new run id) would otherwise
            # pin its run for ever. A claim written within run_age_s may have its upload in flight, and
            # any object under models/<claimed>/ (weights, an incomplete version gc has not yet
            # collected) means it got that far: both keep it in progress.
            elif info.modified <= now - run_age_s and not self.store.list(version_prefix(version)):
                claims[run] = ("abandoned", version)
            else:
                claims[run] = ("in progress", version)
        return claims

    def _collectable_run(self, run: str, infos: list[ObjectInfo], registered: set[str],
                         claims: dict[str, tuple[ClaimState, str | None]],
                         protected: set[str], run_age_s: float, run_min_age_s: float,
                         kept: dict[str, str], now: float) -> list[str]:
        newest = max(i.modified for i in infos)
        if newest > now - run_min_age_s:
            kept[run] = f"touched {int(now - newest)} s ago (younger than {int(run_min_age_s)} s)"
            return []
        claim = claims.get(run, (None, None))[0]
        if claim == "unreadable":  # what it claimed is unknown: nothing of the run goes
            kept[run] = "its registration claim cannot be read"
            return []
        if claim == "in progress":
            kept[run] = "its registration is in progress (claimed, not yet indexed)"
            return []
        # A claim for a version deleted since (its index entry went with it), or an abandoned one:
        # nothing will ever register for the run again, so it is collected like any run that never
        # registered.
        if run not in registered and newest > now - run_age_s:
            kept[run] = "not registered and not yet abandoned"
            return []
        named = [i.key for i in infos if i.key in protected]
        if named:
            kept[run] = f"keeps {', '.join(named)}: named by a model version"
        return [i.key for i in infos if i.key not in protected]

    def plan_gc(self, older_than_s: float = 3600.0, runs: bool = False, run_age_s: float = 7 * DAY_S,
                keep_last: int | None = None, run_min_age_s: float = RUN_MIN_AGE_S) -> GcPlan:
        # An age guard below zero (or NaN, which every comparison fails) puts the cutoff in the
        # future: a version being registered or a run writing checkpoints right now would be collected.
        check_age("--older-than-hours", older_than_s, 3600)
        check_age("--run-age-days", run_age_s, DAY_S)
        check_age("--run-min-age-hours", run_min_age_s, 3600)
        # The store's clock once, before every listing: what is written after it reads as younger, kept.
        now = self.store.clock()
        orphans = self._orphan_objects(older_than_s, now=now)
        cutoff = now - older_than_s
        probes = [i.key for i in self.store.list_info(PROBE_PREFIX) if i.modified <= cutoff]
        run_objects: dict[str, list[str]] = {}
        abandoned_claims: dict[str, str] = {}
        kept: dict[str, str] = {}
        if runs:
            index = self.store.list_info(RUN_INDEX_PREFIX)
            # Top-level entries only: claims and tombstones sit in folders below.
            registered = {i.key[len(RUN_INDEX_PREFIX):-len(".json")] for i in index
                          if i.key.endswith(".json") and "/" not in i.key[len(RUN_INDEX_PREFIX):]}
            claims = self._claims_of_unindexed_runs(index, registered, run_age_s, now)
            protected = self.protected_keys()
            by_run: dict[str, list[ObjectInfo]] = {}
            for info in self.store.list_info("runs/"):
                by_run.setdefault(info.key.split("/")[1], []).append(info)
            for run, infos in by_run.items():
                objects = self._collectable_run(run, infos, registered, claims, protected, run_age_s,
                                                run_min_age_s, kept, now)
                if objects:
                    run_objects[run] = objects
            # An abandoned claim goes with its run, or alone when the run left nothing under runs/;
            # never while any of the run's objects is kept.
            abandoned_claims = {run: version for run, (state, version) in claims.items()
                                if state == "abandoned" and version is not None
                                and (run in run_objects or run not in by_run) and run not in kept}
        old_versions: list[str] = []
        if keep_last is not None:
            if keep_last < 0:
                raise ValueError(f"--keep-last must be >= 0, got {keep_last}")
            # Newest by the time model.json was written (from the listing: no extra request).
            written = {i.key.split("/")[1]: i.modified for i in self.store.list_info("models/")
                       if i.key.endswith("/" + SPEC_FILE)}
            by_age = sorted(written, key=lambda v: (written[v], v))
            # by_age[-n:] holds them all when n exceeds their count (len - n would be a negative
            # index, keeping only the newest few).
            newest = set(by_age[-keep_last:]) if keep_last else set()
            # A version written within the age guard may be a challenger a retrain is gating right now.
            in_flight = {v for v in by_age if written[v] > cutoff}
            protected_versions = self.protected_versions()
            old_versions = [v for v in by_age
                            if v not in newest and v not in in_flight and v not in protected_versions]
        return GcPlan(orphans=orphans, runs=run_objects, claims=abandoned_claims, versions=old_versions, probes=probes,
                      kept=kept, older_than_s=older_than_s, run_min_age_s=run_min_age_s)

    def _delete_run_objects(self, run: str, planned: list[str], min_age_s: float, now: float) -> int | None:
        """How many objects went; None when the run was skipped."""
        # Re-listed now: a run that a retrain resumed since the plan (a new checkpoint) is skipped whole.
        infos = self.store.list_info(f"runs/{run}/")
        if infos and max(i.modified for i in infos) > now - min_age_s:
            log.info("run %s was written since gc planned; kept", run)
            return None
        current = {i.key for i in infos}
        return self.store.delete_keys([k for k in planned if k in current])

    def apply_gc(self, plan: GcPlan, delete_versions: bool = False) -> None:
        # The store's clock once, before the re-listings: an earlier "now" only understates ages.
        now = self.store.clock()
        for version in plan.orphans:
            # Re-listed one by one: a registration that completed (or wrote again) since the plan keeps all.
            objects = self._orphan_objects(plan.older_than_s, version, now).get(version)
            if objects is None:
                log.info("model version %s was completed or written since gc planned; kept", version)
                continue
            self.store.delete_keys(objects)
        if plan.runs or plan.claims:
            protected = self.protected_keys()  # re-read: a version registered since the plan may name one
            for run in sorted(plan.runs.keys() | plan.claims.keys()):
                claimed = plan.claims.get(run)
                # Re-listed now: a retry of the registration that uploaded since the plan keeps its run.
                if claimed is not None and self.store.list(version_prefix(claimed)):
                    log.info("run %s resumed its registration of %s since gc planned; kept", run, claimed)
                    continue
                if run in plan.runs and self._delete_run_objects(
                        run, [k for k in plan.runs[run] if k not in protected], plan.run_min_age_s, now) is None:
                    continue
                if claimed is not None:
                    self.store.delete(claim_key(run))
        self.store.delete_keys(plan.probes)
        if delete_versions:
            protected_versions = self.protected_versions()  # re-read: a promotion may have landed since
            for version in plan.versions:
                if version not in protected_versions:
                    self.delete_version(version)

    def delete_version(self, version: str) -> int:
        """Remove a complete, never-served version, for good: its id is tombstoned first (never
        registered or promoted again), the champion is read again, then model.json goes (so it is never
        listed as complete while its weights go), then the rest, then the gate's record and reports
        on it."""
        check_version_id(version)
        if version in self.protected_versions():
            raise RegistryError(f"model version {version} is the champion or in its promotion history; kept")
        prefix = version_prefix(version)
        try:
            spec = self._read_spec(version)
        except ProteinError:
            spec = {}  # a broken record is deleted all the same
        tombstone = {"model_id": version, "deleted_at": dt.datetime.now(dt.UTC).isoformat(), "actor": self.actor,
                     "run_id": spec.get("run_id")}
        with contextlib.suppress(PreconditionFailed):  # an earlier, interrupted delete: finish it
            self.store.put_bytes(tombstone_key(version), json.dumps(tombstone).encode(), if_none_match=True)
        if version in self.protected_versions():
            # A promotion landed between the first check and the tombstone: it wins, the delete is refused.
            # The promotion may also have seen the tombstone and undone itself; either way nothing is lost.
            try:
                self.store.delete(tombstone_key(version))
            except ProteinError as exc:
                log.warning("could not lift the tombstone of %s: %s", version, exc)
            raise RegistryError(f"model version {version} was promoted while it was being deleted; kept")
        self.store.delete(prefix + SPEC_FILE)
        count = 1 + self.store.delete_prefix(prefix)
        run_id = spec.get("run_id")
        if isinstance(run_id, str):
            try:
                if self.find_by_run(run_id) == version:
                    self.store.delete(run_index_key(run_id))
            except (NotFound, ProteinError) as exc:
                log.warning("run index of %s left as is: %s", run_id, exc)
        # Last: a delete that fails before here leaves at worst a record of a deleted version, never a
        # listed version without its gate record (a rerun would take it for never judged and gate again).
        self.store.delete(gate_record_key(version))
        self.store.delete_prefix(report_prefix(version))
        return count
