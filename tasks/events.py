"""Prefect events of the protein pipeline: one vocabulary, emitted from the tasks layer and from
CLI verbs (which import this module lazily, so `protein/` never imports Prefect).

Every helper does nothing when no Prefect API is configured (PREFECT_API_URL unset): the CLI
and the library work offline, and an event is never the reason a command or a run fails.
Automations (deployments/automations.yaml) and the retrain deployment trigger
(deployments/prefect.yaml) match on these names and resource labels, so they are a contract:
rename nothing without updating both."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

DATASET_PUSHED = "protein.dataset.pushed"
VALIDATION_PASSED = "protein.validation.passed"
VALIDATION_FAILED = "protein.validation.failed"
MODEL_REGISTERED = "protein.model.registered"
MODEL_PROMOTED = "protein.model.promoted"
MODEL_REJECTED = "protein.model.rejected"
SUBMISSION_WRITTEN = "protein.submission.written"

# A CLI process waits at most this long for the server to take its event.
CLI_EMIT_TIMEOUT_S = 10.0
# Findings and reasons are cut so an event stays far below the server's size limit.
MAX_LIST_ITEMS = 20
# Names the ids of protein.model.promoted events (promotion_event_id); changing it changes every id.
PROMOTION_EVENTS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:protein:event:" + MODEL_PROMOTED)


def api_configured() -> bool:
    """True when a Prefect API is configured; without one no event is sent (and no temporary
    server is started just to receive it)."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


def _resource(kind: str, ident: str, name: str, **labels: str) -> dict[str, str]:
    return {"prefect.resource.id": f"protein.{kind}.{ident}", "prefect.resource.name": name,
            "prefect.resource.role": kind, **labels}


def _related(kind: str, ident: str, name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"protein.{kind}.{ident}", "prefect.resource.role": kind,
            "prefect.resource.name": name}


def _emit(event: str, resource: dict[str, str], payload: Mapping[str, Any],
          related: Sequence[dict[str, str]] = (), event_id: uuid.UUID | None = None) -> bool:
    """Queue an event on Prefect's events worker; inside a flow or task run it gets the run,
    flow and deployment as related resources, which the automations match on."""
    if not api_configured():
        return False
    from prefect.events import emit_event

    try:
        sent = emit_event(event=event, resource=resource, payload=dict(payload), related=list(related),
                          **({"id": event_id} if event_id else {}))
    except Exception as exc:  # an event reports on the work; losing one must not fail the work
        logger.warning("could not emit %s: %s", event, exc)
        return False
    return sent is not None


def _emit_now(event: str, resource: dict[str, str], payload: Mapping[str, Any], event_id: str | None = None) -> bool:
    """Send one event and close the connection before returning: a CLI process exits right
    after, and the events worker's queue would die with it. When the close handshake ends the
    API has the event; it is in Redis a moment later (each API publishes what it receives at
    once: deployments/ha_stack/). An API lost in that moment loses it, and the nightly, which
    follows the channel, trains the push instead. ``event_id`` (a UUID) when the caller recorded
    the id elsewhere first (the dataset channel does)."""
    if not api_configured():
        return False
    from prefect.events import Event
    from prefect.events.clients import get_events_client

    async def send() -> None:
        async with get_events_client(reconnection_attempts=2) as client:
            ids = {"id": uuid.UUID(event_id)} if event_id else {}
            await client.emit(Event(event=event, resource=resource, payload=dict(payload), **ids))

    try:
        asyncio.run(asyncio.wait_for(send(), CLI_EMIT_TIMEOUT_S))
    except Exception as exc:  # the data is in the store either way; say the event was lost
        logger.warning("could not emit %s (nothing will be triggered): %s", event, exc)
        return False
    return True


def dataset_pushed(uri: str, fingerprint: str, counts: Mapping[str, int], channel: str, sequence: int,
                   event_id: str) -> bool:
    """After `protein datasets push` moved ``channel`` to push ``sequence``: the event the retrain
    deployment trigger starts on (it retrains on the channel, resolved when the run starts).
    ``event_id`` is the one the channel entry records. Called from the CLI, so it is sent
    synchronously."""
    resource = _resource("dataset", fingerprint, uri, **{"protein.dataset.uri": uri,
                                                         "protein.dataset.fingerprint": fingerprint,
                                                         "protein.dataset.channel": channel})
    return _emit_now(DATASET_PUSHED, resource, {"uri": uri, "fingerprint": fingerprint, "counts": dict(counts),
                                                "channel": channel, "sequence": sequence}, event_id)


def validation_finished(dataset: str, fingerprint: str, success: bool, findings: Sequence[str],
                        report_uri: str | None) -> bool:
    return _emit(VALIDATION_PASSED if success else VALIDATION_FAILED,
                 _resource("dataset", fingerprint, dataset, **{"protein.dataset.uri": dataset}),
                 {"uri": dataset, "fingerprint": fingerprint, "success": success,
                  "findings": list(findings)[:MAX_LIST_ITEMS], "findings_total": len(findings),
                  "report_uri": report_uri})


def model_registered(model_id: str, store: str, data_fingerprint: str, metrics: Mapping[str, float]) -> bool:
    return _emit(MODEL_REGISTERED, _resource("model", model_id, model_id, **{"protein.store": store}),
                 {"version": model_id, "store": store, "data_fingerprint": data_fingerprint,
                  "metrics": {k: float(v) for k, v in metrics.items()}},
                 related=[_related("dataset", data_fingerprint, data_fingerprint)] if data_fingerprint else [])


def promotion_event_id(promotion_record_id: str) -> uuid.UUID:
    """The id of the protein.model.promoted event for the promotion the registry recorded under
    ``promotion_record_id`` (its history event's id): every report of one promotion carries this id,
    so the server can tell a report sent again from a new promotion."""
    return uuid.uuid5(PROMOTION_EVENTS, promotion_record_id)


def event_received(event_id: uuid.UUID) -> bool:
    """Whether the server holds an event with this id. False also when it cannot be asked: a caller
    sends its event again, and the server drops a copy of an event it took in the last minutes (it
    deduplicates by id) and stores one event per id."""
    if not api_configured():
        return False
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventIDFilter

    try:
        with get_client(sync_client=True) as client:
            return client.read_events(EventFilter(id=EventIDFilter(id=[event_id])), limit=1).total > 0
    except Exception as exc:  # an event reports on the work; asking about one must not fail the work
        logger.warning("could not ask the server for event %s: %s", event_id, exc)
        return False


def gate_decided(challenger: str, champion_before: str | None, store: str, promoted: bool,
                 challenger_score: float | None, champion_score: float | None, reasons: Sequence[str],
                 dataset: Mapping[str, Any] | None = None, event_id: uuid.UUID | None = None) -> bool:
    """protein.model.promoted after the champion pointer moved, protein.model.rejected when the
    gate kept the champion: version, champion, scores, reasons, and the dataset the run resolved
    (immutable URI, fingerprint, channel push). ``event_id``: promotion_event_id of the promotion."""
    payload = {"version": challenger, "champion_before": champion_before,
               "champion": challenger if promoted else champion_before, "store": store,
               "challenger_score": challenger_score, "champion_score": champion_score,
               "reasons": list(reasons)[:MAX_LIST_ITEMS], "dataset": dict(dataset) if dataset else None}
    related = [_related("model", champion_before, champion_before)] if champion_before else []
    return _emit(MODEL_PROMOTED if promoted else MODEL_REJECTED,
                 _resource("model", challenger, challenger, **{"protein.store": store}), payload, related, event_id)


def submission_written(uri: str, model_id: str, rows: int) -> bool:
    return _emit(SUBMISSION_WRITTEN, _resource("submission", uri, uri),
                 {"uri": uri, "version": model_id, "rows": rows},
                 related=[_related("model", model_id, model_id)])
