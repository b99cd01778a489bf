"""The reference label profile drift is measured against, kept in the store.

It is the profile of the champion's training data: written when a model is promoted (from the
validation report of the dataset it was trained on), or set explicitly by `protein validate
--accept`. An ordinary validation run, passing or not, never moves it. Without one in the store,
the real train.csv statistics are the reference.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from protein.errors import NotFound, PreconditionFailed, ProteinError, RecordError, StoreError
from protein.storage.records import RecordSchema, load_record
from protein.validation.drift import PIXEL_PROFILE_KEYS, REFERENCE_PROFILE, check_profile, profile_hash

log = logging.getLogger(__name__)

STORE_PREFIX = "validation"
REFERENCE_PROFILE_KEY = f"{STORE_PREFIX}/reference_profile.json"
REFERENCE_RECORD = RecordSchema("reference label profile", required={"n": int, "class_share": (dict, list),
                                                                      "labels_per_image_share": (dict, list)})
VALIDATION_REPORT = RecordSchema("validation report", required={"profile": dict})


def report_key(data_fingerprint: str) -> str:
    return f"{STORE_PREFIX}/{data_fingerprint}/report.json"


def refused_by_validation(store: Any, data_fingerprint: str) -> bool:
    """Whether the store holds a validation report for this data whose verdict is a failure, judged
    against the reference profile in force now. No report (never validated here) is not a refusal;
    neither is an unreadable one (logged): passing over data must rest on a verdict that was actually
    stored. Nor is a failure judged against another reference (a champion promoted, then rolled
    back): drift against a reference no longer in force said nothing of the data, and it was passed
    over by every nightly after the rollback."""
    try:
        report = load_record(store, report_key(data_fingerprint), VALIDATION_REPORT)
    except NotFound:
        return False
    except RecordError as exc:
        log.warning("ignoring an unreadable validation report: %s", exc)
        return False
    if report.get("success") is not False:
        return False
    reference = report.get("reference")
    judged_against = reference.get("hash") if isinstance(reference, dict) else None
    if judged_against is not None and judged_against != (current := load_reference(store)["hash"]):
        log.info("data %s failed validation against reference %s, not the %s in force now: validated again",
                 data_fingerprint[:12], str(judged_against)[:12], current[:12])
        return False
    return True


def load_reference(store: Any | None) -> dict:
    """The store's reference profile (with its hash and URI), else the built-in real one."""
    if store is not None and store.exists(REFERENCE_PROFILE_KEY):
        try:
            profile = check_profile(load_record(store, REFERENCE_PROFILE_KEY, REFERENCE_RECORD), REFERENCE_PROFILE_KEY)
            return {**profile, "hash": profile_hash(profile), "uri": _uri(store)}
        except (ValueError, RecordError) as exc:
            log.warning("ignoring the stored reference profile, using the built-in one: %s", exc)
    return {**REFERENCE_PROFILE, "hash": profile_hash(REFERENCE_PROFILE), "uri": None}


def reference_record(profile: dict, **provenance: Any) -> dict:
    """The stored form of a reference profile, with its provenance and hash."""
    check_profile(profile, "reference profile")
    record = {"n": profile["n"], "class_share": profile["class_share"],
              "labels_per_image_share": profile["labels_per_image_share"],
              **{k: profile[k] for k in PIXEL_PROFILE_KEYS if profile.get(k) is not None}, **provenance,
              "set_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    record["hash"] = profile_hash(record)
    return record


def put_reference(store: Any, record: dict, announce: bool = True) -> dict:
    """Write a prepared reference record; returns {uri, hash}. ``announce``: log the change now
    (move_champion logs it only once the champion moved with it)."""
    store.put_bytes(REFERENCE_PROFILE_KEY, json.dumps(record, indent=2).encode(), content_type="application/json")
    if announce:
        _announce(record)
    return {"uri": _uri(store), "hash": record["hash"]}


def _announce(record: dict) -> None:
    log.info("reference label profile is now %s (hash %s)", record.get("source"), record["hash"])


def save_reference(store: Any, profile: dict, **provenance: Any) -> dict:
    """Write a profile as the reference; returns {uri, hash}."""
    return put_reference(store, reference_record(profile, **provenance))


def _uri(store: Any) -> str:
    """Durable s3:// or file:// address (never presigned: it is recorded in reports and Prefect)."""
    from protein.links import object_uri

    return object_uri(store, REFERENCE_PROFILE_KEY)


def write_reference_profile(store: Any, model_id: str) -> dict | None:
    """Make the promoted model's training-data profile the reference. Call right after a
    successful promotion (`move_champion` does both as one step). None, with a warning, when the
    model has no profile (the reference stays as it was)."""
    record = champion_reference(store, model_id)
    return put_reference(store, record) if record is not None else None


def champion_reference(store: Any, model_id: str) -> dict | None:
    """The reference record a champion ``model_id`` brings, read but not written: the profile its
    model.json records (its lineage), or for versions registered before that, the validation report
    of the dataset it was trained on (model.json's data_fingerprint). None, with a warning, when
    neither exists."""
    from protein.registry import Registry

    spec = Registry(store).spec(model_id)
    data_fingerprint = spec.get("data_fingerprint")
    if isinstance(spec.get("label_profile"), dict):  # recorded at registration (lineage)
        try:
            profile = check_profile(spec["label_profile"], f"model {model_id} label_profile")
        except ValueError as exc:
            log.warning("model %s: unusable label_profile (%s); trying its validation report", model_id, exc)
        else:
            return reference_record({**stored_pixel_profile(store, data_fingerprint), **profile},
                                    source=f"champion {model_id} training data", model_id=model_id,
                                    data_fingerprint=data_fingerprint)
    key = report_key(str(data_fingerprint)) if data_fingerprint else None
    if key is None or not store.exists(key):
        log.warning("model %s: no validation report for its training data (%s); reference profile unchanged",
                    model_id, data_fingerprint)
        return None
    try:
        report = load_record(store, key, VALIDATION_REPORT)
        profile = check_profile(report["profile"], key)
    except (ValueError, KeyError, TypeError, RecordError) as exc:
        # The promotion already happened; a bad report must not make it look failed (and retried).
        log.warning("model %s: unusable validation report %s (%s); reference profile unchanged", model_id, key, exc)
        return None
    return reference_record(profile, source=f"champion {model_id} training data",
                            model_id=model_id, data_fingerprint=data_fingerprint, dataset=report.get("dataset"))


def move_champion(store: Any, target: str, move: Callable[[], Any]) -> tuple[Any, dict | None]:
    """Move the champion to ``target`` (``move`` is the registry's promote or rollback) and the drift
    reference to ``target``'s profile as one step, with no success-looking half state.

    The reference is written first: if that fails, ``move`` never runs and the pointer has not moved.
    If ``move`` then fails (a lost compare-and-swap, a refused version, a fault after the swap landed),
    the reference is made to describe whoever is champion now, by compare-and-swap on the etag just
    written: the previous reference, unless another promotion moved the champion meanwhile (putting
    back what this one read before would then describe a model that no longer serves), or ``target``'s
    if the swap landed after all. If that write loses, a later move wrote the reference; if it
    fails, the error says which reference is left. Returns (what ``move`` returned, {uri, hash} or None)."""
    record = champion_reference(store, target)
    if record is None:
        return move(), None
    before = store.get_bytes(REFERENCE_PROFILE_KEY) if store.exists(REFERENCE_PROFILE_KEY) else None
    written = put_reference(store, record, announce=False)  # a StoreError here: nothing changed
    ours = store.etag(REFERENCE_PROFILE_KEY)
    try:
        moved = move()
    except BaseException as exc:
        try:
            _restore_after_failed_move(store, target, before, ours)
        except ProteinError as restore_error:  # a store fault, or a champion record it cannot read
            raise StoreError(f"the champion did not move to {target} ({exc}), and the drift reference could not "
                             f"be made to describe the champion again ({restore_error}): {_uri(store)} may "
                             f"describe {target}'s training data; run `protein validate --accept` on the "
                             "champion's data to reset it") from exc
        raise
    _announce(record)  # not before: a refused move puts the old reference back, and the log said otherwise
    return moved, written


def _restore_after_failed_move(store: Any, target: str, before: bytes | None, ours: str | None) -> None:
    """After a failed move to ``target``: the reference describes the champion as it is now, written
    only over this move's own reference (etag ``ours``); a later move's reference is left alone."""
    from protein.registry import Registry

    now = Registry(store).champion().champion
    if now == target:  # the swap landed, then something after it failed: the reference written is right
        return
    restored: bytes | None = before
    if now is not None and (before is None or _described_model(before) != now):
        # Another promotion moved the champion since this move read the reference.
        record = champion_reference(store, now)
        restored = json.dumps(record, indent=2).encode() if record is not None else before
    try:
        if restored is None:
            if store.etag(REFERENCE_PROFILE_KEY) == ours:
                store.delete(REFERENCE_PROFILE_KEY)
        else:
            store.put_bytes(REFERENCE_PROFILE_KEY, restored, if_match=ours, content_type="application/json")
    except PreconditionFailed:
        log.info("the drift reference was rewritten by another move since this one wrote it; left as it is")


def _described_model(reference: bytes) -> str | None:
    try:
        doc = json.loads(reference)
    except ValueError:
        return None
    return doc.get("model_id") if isinstance(doc, dict) else None


def stored_pixel_profile(store: Any, data_fingerprint: Any) -> dict:
    """Row hashes and image statistics from the validation report of the data (model.json's
    label profile has only label shares); empty when there is no usable report."""
    key = report_key(str(data_fingerprint)) if data_fingerprint else None
    if key is None or not store.exists(key):
        return {}
    try:
        profile = load_record(store, key, VALIDATION_REPORT)["profile"]
        check_profile(profile, key)
    except (ValueError, KeyError, TypeError, RecordError):
        return {}
    return {k: profile[k] for k in PIXEL_PROFILE_KEYS if profile.get(k) is not None}
