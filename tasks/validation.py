from __future__ import annotations

import datetime as dt
import functools
import hashlib
import importlib.metadata
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from protein.data import fingerprint, open_dataset
from protein.errors import ProteinError
from protein.process_gc import import_frozen
from protein.storage import open_store
from protein.validation import ValidationConfig
from protein.validation.gx_loading import defer_what_gx_never_runs
from tasks import events
from tasks.retry import retry_transient

# A cached verdict is reused for at most this long, even if nothing in its key changed.
VALIDATION_CACHE_EXPIRY = dt.timedelta(days=7)


# Rules the verdict applies from outside protein/validation/, relative to protein/.
VERDICT_RULES_OUTSIDE = ("data/png.py", "data/layout.py", "data/tables.py", "labels.py")


@functools.cache
def validation_code_version() -> str:
    """What the verdict depends on besides data, settings and reference: the project version, the
    validation package's source (suites, custom Expectations, drift rules, image checks), the rules
    it applies from outside that package (the PNG decoder whose verdict counts, the id and table
    rules, the label parser), and the Great Expectations and Pillow versions (Pillow decodes every
    image). A checkout rarely bumps the project version: a fix to the decoder kept old passes."""
    import protein.validation

    project = Path(protein.validation.__file__).parents[1]
    sources = [*sorted((project / "validation").glob("*.py")), *(project / rule for rule in VERDICT_RULES_OUTSIDE)]
    digest = hashlib.sha256()
    for path in sources:
        digest.update(str(path.relative_to(project)).encode() + b"\0" + path.read_bytes())
    versions = "|".join(f"{name}={importlib.metadata.version(name)}"
                        for name in ("protein-pipeline", "great_expectations", "pillow"))
    return hashlib.sha256(versions.encode() + digest.digest()).hexdigest()[:16]


def validation_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """Keyed by the data fingerprint, the settings, the reference profile's hash and the code and
    library versions: unchanged data is not validated twice, but a new champion (a new reference),
    a changed rule or a new GX or Pillow re-validates it. Entries expire after
    VALIDATION_CACHE_EXPIRY in any case."""
    config: ValidationConfig = parameters["config"]
    store = parameters.get("store")
    try:
        from protein.validation import load_reference  # numpy: only a run that validates needs it

        data_fingerprint = fingerprint(open_dataset(parameters["data"]))
        reference = load_reference(open_store(store) if store else None)
    except ProteinError:
        return None  # unreadable data or store is not cached; the task itself reports why

    # repr, not hash(): str hashes are salted per process and a cache key must survive restarts.
    settings = hashlib.sha256(f"{config!r}|{store}".encode()).hexdigest()[:16]
    return f"validate-{data_fingerprint}-{settings}-ref{reference['hash']}-code{validation_code_version()}"


@task(name="validate-data", retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=retry_transient,
      timeout_seconds=3600,
      cache_key_fn=validation_cache_key, cache_expiration=VALIDATION_CACHE_EXPIRY, persist_result=True,
      result_serializer="json")
def validate_data(data: str, config: ValidationConfig, store: str | None = None) -> dict[str, Any]:
    from protein.validation import run_validation  # pandas and GX: only a run that validates needs them

    defer_what_gx_never_runs()  # GX's import would load scipy.stats and altair, which no check here uses
    import_frozen(["great_expectations"])  # its objects out of the collector's way for the rest of the run
    # The report and Data Docs reach the store (linked from the artifact); the host keeps no copy,
    # so a month of nightly runs leaves no folder behind, whatever the outcome.
    with tempfile.TemporaryDirectory(prefix="protein-validation-") as report_dir:
        report = run_validation(data, config, store_uri=store, report_dir=Path(report_dir))
    verdict = "passed" if report.success else "FAILED"
    lines = [f"# Data validation {verdict}", "", f"- dataset: `{report.dataset}`",
             *[f"- not checked: {check}" for check in report.skipped],
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
            "failures": summary, "warnings": report.warning_lines(), "skipped_checks": report.skipped,
            "report_uri": report.report_uri, "docs_uri": report.docs_uri,
            "reference_hash": report.reference.get("hash"), "reference_uri": report.reference.get("uri")}
