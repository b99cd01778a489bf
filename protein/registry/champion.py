"""The champion pointer: read, promote, roll back, and the pins that bind it to content.

Every promote or rollback event records the SHA-256 of the weights and of the exact model.json bytes
it made the champion (``weights_sha256``, ``spec_sha256``). Resolving the champion (and any version
that once served) checks both against what the store holds now, so a weights file and model.json
rewritten together, consistently with each other and with their checksum metadata, are still refused:
the record that moved the pointer says what it pointed at. This holds where the store enforces no
write conditions at all (a local folder, an endpoint without condition keys). Events written before
pinning carry no hashes; such a champion is served with a warning until the next promotion pins it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from protein.errors import NotFound, PreconditionFailed, PromotionConflict, RegistryError
from protein.registry.records import (
    CHAMPION_KEY,
    CHAMPION_RECORD,
    ChampionState,
    new_event_id,
    pinned_hashes,
    promotion_stack,
    resolve_champion_name,
    spec_digest,
    tombstone_key,
    utc_now,
)
from protein.storage import Store
from protein.storage.records import load_record

log = logging.getLogger("protein.registry")


class ChampionMixin:
    """Champion operations for `Registry` (which supplies ``store``, ``actor`` and ``require_intact``)."""

    store: Store
    actor: str

    def require_intact(self, version: str, check_bytes: bool = False) -> tuple[dict[str, Any], bytes]:  # by Registry
        raise NotImplementedError

    def _refuse_tombstoned(self, version: str) -> None:  # supplied by Registry
        raise NotImplementedError

    def _event(self, action: str, model_id: str | None, previous: str | None, reason: str,
               event_id: str | None, actor: str | None, **pins: str) -> dict[str, Any]:
        return {"event_id": event_id or new_event_id(), "action": action, "model_id": model_id,
                "previous": previous, "at": utc_now(), "actor": actor or self.actor, "reason": reason, **pins}

    def champion(self) -> ChampionState:
        etag = self.store.etag(CHAMPION_KEY)
        if etag is None:
            return ChampionState(None, [], None)
        # The etag is read before the bytes: if a write lands in between, the bytes are newer
        # than the etag and our compare-and-swap fails safe (a spurious conflict, never a
        # lost update).
        try:
            doc = load_record(self.store, CHAMPION_KEY, CHAMPION_RECORD)
        except NotFound:  # deleted between the HEAD and the GET
            return ChampionState(None, [], None)
        return ChampionState(doc["champion"], doc["history"], etag)

    def verified(self, version: str, state: ChampionState | None = None,
                 check_bytes: bool = False) -> tuple[dict[str, Any], bytes]:
        """(model.json, its exact bytes) of an intact version whose content is the one its newest promotion
        pinned, if it was ever promoted; RegistryError otherwise. ``check_bytes`` hashes the weights
        themselves (a full read): promote and rollback, which make a version serve, ask for it."""
        spec, spec_bytes = self.require_intact(version, check_bytes)
        spec_sha256 = spec_digest(spec_bytes)
        state = state if state is not None else self.champion()
        pins = pinned_hashes(state.history, version)
        if pins is None:
            if version == state.champion:
                log.warning("champion %s was promoted before events were pinned to content; served on its "
                            "own checksums only (the next promotion pins it)", version)
            return spec, spec_bytes
        weights_pin, spec_pin = pins
        if spec_sha256 != spec_pin or str(spec["weights_sha256"]).lower() != weights_pin.lower():
            what = "model.json" if spec_sha256 != spec_pin else "weights"
            raise RegistryError(
                f"model version {version}: {what} in {self.store.uri} is not the one its promotion pinned "
                f"(model.json sha256 {spec_sha256[:16]}.., pinned {spec_pin[:16]}..; weights "
                f"{str(spec['weights_sha256'])[:16]}.., pinned {weights_pin[:16]}..); rewritten after "
                "promotion? refused")
        return spec, spec_bytes

    def resolve(self, version: str) -> str:
        """'champion' -> the champion's id; anything else must name a complete, intact version. Either
        way a version that ever served must still hold the content its promotion pinned."""
        state = self.champion()
        version = resolve_champion_name(version, state, self.store.uri)
        self.verified(version, state)
        return version

    def _swap(self, expected: ChampionState, champion: str | None, event: dict[str, Any]) -> ChampionState:
        doc = {"champion": champion, "history": [*expected.history, event]}
        data = json.dumps(doc, indent=2).encode()
        try:
            if expected.etag is None:
                etag = self.store.put_bytes(CHAMPION_KEY, data, if_none_match=True)
            else:
                # The etag this very read returned: never a wildcard or a remembered value.
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
        version = resolve_champion_name(version, state, self.store.uri)
        spec, spec_bytes = self.verified(version, state, check_bytes=True)
        if expected_champion is not ... and state.champion != expected_champion:
            raise PromotionConflict(
                f"champion is {state.champion or 'none'}, expected {expected_champion or 'none'}; "
                "another promotion happened in between, nothing was changed"
            )
        self._refuse_tombstoned(version)
        event = self._event("promote", version, state.champion, reason, event_id, actor,
                            weights_sha256=str(spec["weights_sha256"]), spec_sha256=spec_digest(spec_bytes))
        new = self._swap(state, version, event)
        if self.store.exists(tombstone_key(version)):
            # `delete_version` tombstoned it between our check and our swap: undo, never point at a deletion.
            self._undo_promotion(new, state, version)
        log.info("promoted %s (previous champion: %s)", version, state.champion)
        return new

    def _undo_promotion(self, new: ChampionState, before: ChampionState, version: str) -> None:
        pins = pinned_hashes(before.history, before.champion) if before.champion else None
        undo = self._event("rollback", before.champion, version, f"promotion undone: {version} is being deleted",
                           None, None, **({"weights_sha256": pins[0], "spec_sha256": pins[1]} if pins else {}))
        try:
            self._swap(new, before.champion, undo)
        except PromotionConflict:
            raise RegistryError(f"model version {version} was deleted while it was promoted, and the champion "
                                "moved again before the promotion could be undone; run `protein models history` "
                                "and roll back") from None
        raise PromotionConflict(f"model version {version} was being deleted ({tombstone_key(version)}); the "
                                f"promotion was undone and the champion is {before.champion or 'none'} again")

    def rollback_target(self, state: ChampionState | None = None) -> str:
        """The champion a rollback would return to (one step down the promotion stack)."""
        state = state if state is not None else self.champion()
        if state.champion is None:
            raise RegistryError(f"{self.store.uri} has no champion to roll back")
        stack = promotion_stack(state.history)
        if len(stack) < 2:
            raise RegistryError(f"champion {state.champion} has no previous champion to roll back to")
        return stack[-2]

    def rollback(self, reason: str = "", event_id: str | None = None, actor: str | None = None,
                 expected_champion: str | None | type = ...) -> ChampionState:
        """Make the champion before the current one the champion again (one step down the stack); with
        ``expected_champion``, only if the champion is still that one."""
        state = self.champion()
        if event_id is not None and state.has_event(event_id):
            return state
        if expected_champion is not ... and state.champion != expected_champion:
            raise PromotionConflict(f"champion is {state.champion or 'none'}, expected {expected_champion or 'none'}; "
                                    "nothing was rolled back")
        target = self.rollback_target(state)
        spec, spec_bytes = self.verified(target, state, check_bytes=True)
        event = self._event("rollback", target, state.champion, reason, event_id, actor,
                            weights_sha256=str(spec["weights_sha256"]), spec_sha256=spec_digest(spec_bytes))
        new = self._swap(state, target, event)
        log.info("rolled back from %s to %s", state.champion, target)
        return new
