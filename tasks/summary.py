"""What a person reading a retrain run wants first: what data, what happened, where things are.
Also the unchanged-data check of the nightly schedule and the check of trigger-supplied URIs."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from protein.config import TrainConfig
from protein.data import fingerprint, open_dataset
from protein.data.channels import CHANNEL_SCHEME, parse_channel_ref
from protein.errors import DataError
from protein.evaluation.gated_data import gated_before
from protein.registry import Registry
from protein.storage import open_store
from protein.storage.s3_clients import redacted_uri
from tasks.retry import retry_transient


def dataset_uri_problem(data: object) -> str | None:
    """Why ``data`` cannot be a dataset URI (None when it can): channel:<name>, s3://bucket/key,
    file:///path or an absolute path. Event payloads are rendered into parameters by Jinja, so a missing field
    arrives as an empty string and a wrong one as any text."""
    if not isinstance(data, str) or not data.strip():
        return "missing or empty"
    text = data.strip()
    if text.startswith(CHANNEL_SCHEME):
        if not text.removeprefix(CHANNEL_SCHEME):
            return "missing or empty"
        try:
            parse_channel_ref(text)
        except DataError as exc:
            return str(exc)
        return None
    if text.startswith("s3://"):
        bucket, _, key = text.removeprefix("s3://").partition("/")
        return None if bucket and key.strip("/") else f"{redacted_uri(text)!r} is not s3://bucket/key"
    if text.startswith("file:///") or text.startswith("/"):
        return None
    return f"{redacted_uri(text)!r} is not an s3:// URI, file:// URI or absolute path"


@task(name="champion-data-fingerprint", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def champion_data_fingerprint(store: str, champion: str) -> str | None:
    """The fingerprint of the data the champion was trained on (its model.json)."""
    return Registry(open_store(store)).spec(champion).get("data_fingerprint")


@task(name="gate-judged-data", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def gate_judged_data(store: str, data_fingerprint: str, config: TrainConfig) -> dict[str, Any] | None:
    """The gate's last judgement of a challenger trained on this data with this config, or None."""
    return gated_before(store, data_fingerprint, config)


@task(name="data-fingerprint", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def data_fingerprint(data: str) -> str:
    return fingerprint(open_dataset(data))


def channel_lines(resolved: dict[str, Any] | None) -> list[str]:
    if not resolved:
        return []
    return [f"- resolved from: channel `{resolved['channel']}` push #{resolved['sequence']} "
            f"(event `{resolved['event_id']}`) at run start"]


def run_summary_markdown(summary: dict[str, Any]) -> str:
    """The retrain run summary; ``summary`` holds plain values (URIs, ids, scores, reasons)."""
    lines = [f"# Retrain: {summary['outcome']}", "",
             f"- data: `{summary['data']}`",
             f"- data fingerprint: `{summary.get('data_fingerprint') or 'unknown'}`",
             *channel_lines(summary.get("resolved_from")),
             f"- champion before: `{summary.get('champion_before') or 'none'}`",
             f"- champion after: `{summary.get('champion_after') or 'none'}`"]
    if summary.get("challenger"):
        lines.append(f"- challenger: `{summary['challenger']}`")
    if summary.get("gate"):
        gate = summary["gate"]
        scores = "not scored" if gate.get("challenger_score") is None else f"challenger {gate['challenger_score']:.4f}"
        if gate.get("champion_score") is not None:
            scores += f", champion {gate['champion_score']:.4f}"
        verdict = gate.get("verdict") or ("promoted" if gate["promote"] else "kept champion"
                                          if summary.get("champion_before") else "refused, no champion yet")
        lines += [f"- gate: **{verdict}** "
                  f"({gate.get('metric', 'f1_samples')}: {scores})",
                  "", "## Gate reasons", *[f"- {reason}" for reason in gate["reasons"]]]
    if summary.get("message"):
        lines += ["", summary["message"]]
    links = [(name, uri) for name, uri in summary.get("links", {}).items() if uri]
    if links:
        lines += ["", "## Links", "Durable URIs; `protein link URI` prints an openable link (presigned on S3, "
                  "at most 7 days).", *[f"- {name}: `{uri}`" for name, uri in links]]
    return "\n".join(lines)


@task(name="run-summary", cache_policy=NO_CACHE)
def publish_run_summary(summary: dict[str, Any]) -> None:
    create_markdown_artifact(run_summary_markdown(summary), key="retrain-summary",
                             description=f"retrain of {summary.get('data_fingerprint') or summary['data']}")
