from __future__ import annotations

import hashlib
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from protein.data import fingerprint, open_dataset
from protein.errors import ProteinError
from protein.storage import open_store
from protein.validation import ValidationConfig, load_reference, run_validation
from tasks import events
from tasks.retry import retry_transient


def validation_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Keyed by the data fingerprint, the settings and the reference profile's hash: unchanged data
    is not validated twice, but a new champion (a new reference) re-measures drift."""
    config: ValidationConfig = parameters["config"]
    store = parameters.get("store")
    try:
        data_fingerprint = fingerprint(open_dataset(parameters["data"]))
        reference = load_reference(open_store(store) if store else None)
    except ProteinError:
        return None  # unreadable data or store is not cached; the task itself reports why

    # repr, not hash(): str hashes are salted per process and a cache key must survive restarts.
    settings = hashlib.sha256(f"{config!r}|{store}".encode()).hexdigest()[:16]
    return f"validate-{data_fingerprint}-{settings}-ref{reference['hash']}"


@task(name="validate-data", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_transient,
      timeout_seconds=3600,
      cache_key_fn=validation_cache_key, persist_result=True, result_serializer="json")
def validate_data(data: str, config: ValidationConfig, store: str | None = None) -> dict[str, Any]:
    report = run_validation(data, config, store_uri=store)
    verdict = "passed" if report.success else "FAILED"
    lines = [f"# Data validation {verdict}", "", f"- dataset: `{report.dataset}`",
             f"- fingerprint: `{report.data_fingerprint}`", f"- took {report.seconds:.1f} s"]
    if report.docs_uri:
        lines.append(f"- [Data Docs]({report.docs_uri})")
    if report.report_uri:
        lines.append(f"- [report.json]({report.report_uri})")
    lines.append(f"- drift reference: {report.reference.get('source')} (hash `{report.reference.get('hash')}`)")
    summary = report.summary_lines()
    if summary:
        lines += ["", "## Findings", *[f"- {line}" for line in summary]]
    create_markdown_artifact("\n".join(lines), key="validation-summary",
                             description=f"validation of {report.data_fingerprint}")
    events.validation_finished(data, report.data_fingerprint, report.success, summary, report.report_uri)
    return {"success": report.success, "data_fingerprint": report.data_fingerprint,
            "failures": summary, "report_uri": report.report_uri, "docs_uri": report.docs_uri,
            "reference_hash": report.reference.get("hash"), "reference_uri": report.reference.get("uri")}
