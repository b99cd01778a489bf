"""Retention: what `protein models gc` may delete, and the rules that keep it from racing a
registration or removing anything a rollback could need."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from protein.errors import RegistryError
from protein.registry.records import (
    DAY_S,
    PROBE_PREFIX,
    RUN_INDEX_PREFIX,
    SPEC_FILE,
    ChampionState,
    check_version_id,
    run_index_key,
    version_prefix,
)
from protein.storage import Store


@dataclass(frozen=True)
class GcPlan:
    """What `Registry.plan_gc` found; nothing is deleted until `Registry.apply_gc`."""

    orphans: dict[str, list[str]] = field(default_factory=dict)  # version -> its incomplete objects
    runs: dict[str, list[str]] = field(default_factory=dict)  # run id -> its checkpoint objects
    versions: list[str] = field(default_factory=list)  # complete versions past --keep-last
    probes: list[str] = field(default_factory=list)


class RetentionMixin:
    """Garbage collection for `Registry` (which supplies ``store``, ``champion``, ``find_by_run`` and
    ``_read_spec``)."""

    store: Store

    def orphans(self, older_than_s: float = 0.0) -> list[str]:
        """Version folders with no model.json (an interrupted registration) whose newest object is
        older than ``older_than_s``: a registration in progress is younger and left alone."""
        return sorted(self._orphan_objects(older_than_s))

    def _orphan_objects(self, older_than_s: float) -> dict[str, list[str]]:
        by_version: dict[str, list[Any]] = {}
        for info in self.store.list_info("models/"):
            by_version.setdefault(info.key.split("/")[1], []).append(info)
        cutoff = time.time() - older_than_s
        return {
            version: [i.key for i in infos]
            for version, infos in by_version.items()
            if not any(i.key.endswith("/" + SPEC_FILE) for i in infos) and max(i.modified for i in infos) <= cutoff
        }

    def delete_orphan(self, version: str, older_than_s: float = 0.0) -> int:
        """Remove an incomplete version's own objects (not a whole prefix); refuses complete versions."""
        check_version_id(version)
        objects = self._orphan_objects(older_than_s).get(version)
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

    def plan_gc(self, older_than_s: float = 3600.0, runs: bool = False, run_age_s: float = 7 * DAY_S,
                keep_last: int | None = None) -> GcPlan:
        orphans = self._orphan_objects(older_than_s)
        cutoff = time.time() - older_than_s
        probes = [i.key for i in self.store.list_info(PROBE_PREFIX) if i.modified <= cutoff]
        run_objects: dict[str, list[str]] = {}
        if runs:
            registered = {k[len(RUN_INDEX_PREFIX):-len(".json")] for k in self.store.list(RUN_INDEX_PREFIX)
                          if k.endswith(".json")}
            by_run: dict[str, list[Any]] = {}
            for info in self.store.list_info("runs/"):
                by_run.setdefault(info.key.split("/")[1], []).append(info)
            abandoned_before = time.time() - run_age_s
            run_objects = {
                run: [i.key for i in infos] for run, infos in by_run.items()
                if run in registered or max(i.modified for i in infos) <= abandoned_before
            }
        old_versions: list[str] = []
        if keep_last is not None:
            if keep_last < 0:
                raise ValueError(f"--keep-last must be >= 0, got {keep_last}")
            # Newest by the time model.json was written (from the listing: no extra request).
            written = {i.key.split("/")[1]: i.modified for i in self.store.list_info("models/")
                       if i.key.endswith("/" + SPEC_FILE)}
            by_age = sorted(written, key=lambda v: (written[v], v))
            newest = set(by_age[len(by_age) - keep_last:]) if keep_last else set()
            protected = self.protected_versions()
            old_versions = [v for v in by_age if v not in newest and v not in protected]
        return GcPlan(orphans=orphans, runs=run_objects, versions=old_versions, probes=probes)

    def apply_gc(self, plan: GcPlan, delete_versions: bool = False) -> None:
        for objects in plan.orphans.values():
            self.store.delete_keys(objects)
        for objects in plan.runs.values():
            self.store.delete_keys(objects)
        self.store.delete_keys(plan.probes)
        if delete_versions:
            protected = self.protected_versions()  # re-read: a promotion may have landed since planning
            for version in plan.versions:
                if version not in protected:
                    self.delete_version(version)

    def delete_version(self, version: str) -> int:
        """Remove a complete, never-served version: model.json first, so it is never listed as complete
        while its weights go away."""
        if version in self.protected_versions():
            raise RegistryError(f"model version {version} is the champion or in its promotion history; kept")
        prefix = version_prefix(version)
        try:
            spec = self._read_spec(version)
        except RegistryError:
            spec = {}
        self.store.delete(prefix + SPEC_FILE)
        count = 1 + self.store.delete_prefix(prefix)
        run_id = spec.get("run_id")
        if run_id and self.find_by_run(run_id) == version:
            self.store.delete(run_index_key(run_id))
        return count
