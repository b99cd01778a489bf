"""Dataset channels at run time: resolve a flow's ``data`` once, and read the push order the gate
judges by (protein.data.channels, protein.evaluation.data_order)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from protein.data.channels import channel_of, read_channel, resolve_data
from protein.data.run_resolution import resolve_once
from protein.errors import DataError, RecordError
from protein.validation.reference import refused_by_validation
from tasks.retry import retry_transient


@task(name="resolve-data", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def resolve_dataset(data: str, store: str, trigger_event_id: str | None = None,
                    run_key: str | None = None, pass_over_refused: bool = True) -> dict[str, Any]:
    """``data`` resolved to an immutable dataset (ResolvedData as a dict), plus
    ``trigger_sequence``: the channel push whose event started this run, when it is on the channel.
    A channel that cannot be resolved is ``{"problem": ..., "exit_code": ...}``, for the flow to fail on
    in one line with the CLI's exit code for its cause (2 no push or a refused URI, 8 a damaged record).
    With ``run_key`` (the flow run's id) a retry of the run takes its first attempt's resolution
    (protein.data.run_resolution), so it resumes that training instead of starting another.
    ``pass_over_refused`` off: the channel's head even when validation refused it (a validate run
    judges the newest push again, not the newest one that passed)."""

    def resolve() -> dict[str, Any]:
        try:
            resolved = resolve_data(data, store, refused=refused_by_validation if pass_over_refused else None,
                                    own_event_id=trigger_event_id)
        except (DataError, ValueError, RecordError) as exc:
            # ValueError: a store URI open_store refuses; RecordError: a channel record that is not
            # one, or over the record cap. No retry mends either.
            return {"problem": str(exc), "exit_code": getattr(exc, "exit_code", 2)}
        result: dict[str, Any] = {**resolved.to_dict(), "trigger_sequence": None}
        if trigger_event_id and resolved.channel:
            store_, name = channel_of(data, store)
            pushed = read_channel(store_, name).entry_for_event(trigger_event_id)
            result["trigger_sequence"] = pushed.sequence if pushed else None
        return result

    if run_key is None:
        return resolve()
    try:
        result, kept = resolve_once(data, store, run_key, resolve)
    except ValueError as exc:  # the store URI itself, refused before anything is read
        return {"problem": str(exc), "exit_code": 2}
    if kept:
        get_run_logger().info("data %s: push #%s (%s), as this run's first attempt resolved it", data,
                              result.get("sequence"), str(result.get("fingerprint"))[:12])
    return result


@task(name="data-push-order", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def data_push_order(data: str, store: str, challenger_fingerprint: str,
                    champion_fingerprint: str | None) -> dict[str, Any]:
    """Where challenger's and champion's data stand in push order on the run's channel (the one
    ``data`` names, else the store's default channel); a sequence is None when never pushed there."""
    store_, name = channel_of(data, store)
    channel = read_channel(store_, name)
    return {"channel": name, "challenger_sequence": channel.push_order(challenger_fingerprint),
            "champion_sequence": channel.push_order(champion_fingerprint) if champion_fingerprint else None}
