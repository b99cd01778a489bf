"""Model registry over an object store.

Layout (all keys relative to the store root):
    models/<version>/model.safetensors   weights, no pickle; written create-only
    models/<version>/model.json          everything needed to rebuild and judge the model, including
                                         the weights' SHA-256 and size; written create-only and last,
                                         so its presence marks a complete version
    registry/runs/<run_id>.json          {"model_id": ...}: which version a training run registered
                                         (create-only, written after model.json), so that question
                                         costs one request however many versions exist
    registry/champion.json               {"champion": <version>|null, "history": [...events]}

A version is immutable: its weights are bound to its model.json by hash and size, checked when they
are downloaded and again when they are loaded, whatever the store's own metadata says. Promotion and
rollback only rewrite champion.json, by compare-and-swap on its etag, so concurrent promotions form one
line of history: the loser gets PromotionConflict and nothing changes. Every event carries an id and
an actor; a retried request whose first attempt landed finds its event id and succeeds.

Files: `records` (keys, ids, events, the weights-to-record check), `model_registry` (`Registry`),
`retention` (what gc may delete).
"""

from __future__ import annotations

from protein.registry.model_registry import Registry
from protein.registry.records import (
    CHAMPION_KEY,
    MODEL_FORMAT,
    PROBE_PREFIX,
    RUN_INDEX_PREFIX,
    SPEC_FILE,
    VERSION_ID,
    WEIGHTS_FILE,
    ChampionState,
    check_local_weights,
    check_run_id,
    check_version_id,
    code_version,
    default_actor,
    gate_record_key,
    new_event_id,
    newest_promotion,
    promotion_stack,
    report_prefix,
    run_index_key,
    utc_now,
    version_prefix,
    weights_mismatch,
)
from protein.registry.retention import GcPlan

__all__ = [
    "CHAMPION_KEY",
    "MODEL_FORMAT",
    "PROBE_PREFIX",
    "RUN_INDEX_PREFIX",
    "SPEC_FILE",
    "VERSION_ID",
    "WEIGHTS_FILE",
    "ChampionState",
    "GcPlan",
    "Registry",
    "check_local_weights",
    "check_run_id",
    "check_version_id",
    "code_version",
    "default_actor",
    "gate_record_key",
    "new_event_id",
    "newest_promotion",
    "promotion_stack",
    "report_prefix",
    "run_index_key",
    "utc_now",
    "version_prefix",
    "weights_mismatch",
]
