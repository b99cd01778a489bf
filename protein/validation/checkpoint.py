"""Great Expectations as the engine: one Data Source, an asset per table, one Checkpoint, one verdict.

Each table (labels rows, file listings, images, image statistics, integrity, drift...) is its own
asset of one pandas Data Source (`protein`): written once as JSON in the GX project and read back
by GX through the asset's whole-table Batch Definition, so every validation result and Data Docs
page names its asset. Each asset has its own Expectation Suite and Validation Definition (same
name as the asset); one Checkpoint runs them all with one run id and, with docs, the run is added
to a Data Docs site that keeps earlier runs.

The verdict is the Checkpoint's result. Checks that only warn are Expectations with GX's own
`severity="warning"`; a run passes when no failed Expectation in the Checkpoint's result has
critical severity (GX's `get_max_severity_failure`). The Checkpoint's plain `success` is False
when anything failed, warnings included; the report records both.

GX is imported inside functions only: importing it costs seconds.
"""

from __future__ import annotations

import copy
import datetime as dt
import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from protein.validation.config import MAX_EXAMPLES, SUITES
from protein.validation.drift import IMAGE_STATISTICS
from protein.validation.expectations import custom_expectations
from protein.validation.gx_loading import import_great_expectations
from protein.validation.suites import INDEX_COLUMNS, Condition, Table

# Our own key per table row, so findings can show columns GX does not return.
ROW_KEY = "table_row"
# Read back as numbers (nulls as NaN) so row conditions can compare them; the rest as written.
NUMERIC_COLUMNS = ("row", "bytes", "bit_depth", "width", "height", "rows", "fields", ROW_KEY, *IMAGE_STATISTICS)
DATA_SOURCE = "protein"
# Expectations over a whole table (BatchExpectation): they take no row_condition.
TABLE_EXPECTATIONS = ("expect_no_content_overlap_between_splits", "expect_no_near_duplicate_images")
CHECKPOINT = "protein-validation"
WHOLE_TABLE = "whole table"  # each asset's one Batch Definition
# Where a GX file project keeps what a run adds to the Data Docs site (protein/validation/history.py
# mirrors both to and from the store).
GX_RESULTS = Path("gx/uncommitted/validations")
GX_DOCS = Path("gx/uncommitted/data_docs/local_site")


@dataclass
class CheckpointOutcome:
    success: bool
    failures: list[dict]
    warnings: list[dict]
    suites: dict[str, dict]  # suite (= asset) name -> the suite's JSON, as GX ran it
    run_name: str
    statistics: dict[str, Any]


def _expectation_class(name: str) -> type:
    import great_expectations.expectations as gxe

    custom = custom_expectations()
    if name in custom:
        return custom[name]
    return getattr(gxe, "".join(part.capitalize() for part in name.split("_")))


def _row_condition(condition: tuple[Condition, ...]) -> Any:
    """GX Condition objects for the rows of its table a check reads (None: every row)."""
    from great_expectations.expectations.row_conditions import AndCondition, Column

    parts = []
    for column, op, value in condition:
        col = Column(column)
        parts.append(col.is_not_null() if op == "notnull" else col == value if op == "==" else
                     col <= value if op == "<=" else col >= value)
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else AndCondition(conditions=parts)


def asset_frame(table: Table) -> pd.DataFrame:
    frame = table.frame.copy()
    for column in INDEX_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    frame[ROW_KEY] = range(len(frame))
    frame = frame.astype(object)
    for column in NUMERIC_COLUMNS:
        if column in frame.columns:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def _write_asset(table: Table, folder: Path) -> tuple[Path, dict[str, str]]:
    """The table as JSON (orient=split keeps the columns of an empty table) and the dtypes to read
    it back with: numbers as float (NaN for null), everything else exactly as written."""
    frame = asset_frame(table)
    path = folder / f"{table.name}.json"
    frame.to_json(path, orient="split", index=False)
    dtypes = {c: "float64" if c in NUMERIC_COLUMNS else "object" for c in frame.columns}
    return path, dtypes


def _project_config(docs_root: Path | None) -> Any:
    """An in-memory GX project: suites, definitions and the Checkpoint live only as long as the run
    (a file project wrote great_expectations.yml again for every asset and batch definition added:
    23 YAML dumps a run, docs/validation.md "Cost"). With ``docs_root``, the two things that outlive
    it are files where a file project keeps them, under docs_root/gx/uncommitted: the validation
    results (the site's index lists every result there, earlier runs' included) and the Data Docs
    site."""
    from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults

    defaults = InMemoryStoreBackendDefaults()
    if docs_root is not None:
        def on_disk(relative: Path) -> dict[str, str]:
            return {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_root / relative)}

        defaults.stores[defaults.validation_results_store_name]["store_backend"] = on_disk(GX_RESULTS)
        defaults.data_docs_sites = {"local_site": {
            "class_name": "SiteBuilder", "show_how_to_buttons": True, "store_backend": on_disk(GX_DOCS),
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}}
    return DataContextConfig(store_backend_defaults=defaults)


def run_checkpoint(tables: list[Table], run_name: str, project_dir: Path, docs: bool) -> CheckpointOutcome:
    """Run every table's checks in one Checkpoint (the tables are written under project_dir); with
    docs, the run's results go under project_dir/GX_RESULTS and it updates the Data Docs site at
    project_dir/GX_DOCS, whose index lists every result there (`_project_config`)."""
    gx = import_great_expectations()
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig
    from great_expectations.expectations.metadata_types import FailureSeverity

    context = gx.get_context(mode="ephemeral", project_config=_project_config(project_dir if docs else None))
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    tables_dir = project_dir / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    by_asset = {t.name: t for t in tables}
    suite_order = {name: i for i, name in enumerate(SUITES)}
    checked = [t for t in sorted(tables, key=lambda t: suite_order[t.suite]) if t.checks]
    # The Data Source gets its assets before it joins the context: each asset or Batch Definition
    # added to a source in a context writes the whole project configuration again (YAML, 22 times
    # a validation, ~10 % of its CPU); added whole, it is written once.
    from great_expectations.datasource.fluent import PandasDatasource

    unattached = PandasDatasource(name=DATA_SOURCE)
    for table in checked:
        path, dtypes = _write_asset(table, tables_dir)
        unattached.add_json_asset(table.name, path_or_buf=path, orient="split", dtype=dtypes) \
            .add_batch_definition_whole_dataframe(WHOLE_TABLE)
    source = context.data_sources.add_pandas(unattached)
    suites: dict[str, Any] = {}
    definitions = []
    for table in checked:
        batch = source.get_asset(table.name).get_batch_definition(WHOLE_TABLE)
        suite = gx.ExpectationSuite(name=table.name)
        for i, check in enumerate(table.checks):
            cls = _expectation_class(check.expectation)
            extra = ({} if check.expectation in TABLE_EXPECTATIONS
                     else {"row_condition": _row_condition(check.condition)})
            suite.add_expectation(cls(**check.kwargs, **extra, severity=check.severity, notes=check.message,
                                      meta={"table": table.name, "check": i}))
        suites[table.name] = context.suites.add(suite)
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=table.name, data=batch, suite=suites[table.name])))
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES,
                     "unexpected_index_column_names": [*INDEX_COLUMNS, ROW_KEY], "return_unexpected_index_query": False}
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=CHECKPOINT, validation_definitions=definitions, actions=[], result_format=result_format))
    run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.UTC))
    result = checkpoint.run(run_id=run_id)
    if docs:
        _build_docs(context, result)

    failures: list[dict] = []
    warnings: list[dict] = []
    severities = []
    for validation in result.run_results.values():
        severities.append(validation.get_max_severity_failure())
        for outcome in validation.results:
            if outcome.success:
                continue
            meta = outcome.expectation_config.meta
            table = by_asset[meta["table"]]
            check = table.checks[int(meta["check"])]
            finding = _finding(table, check, outcome.result or {}, outcome.exception_info or {})
            (failures if check.severity == "critical" else warnings).append(finding)
    failures.sort(key=lambda f: suite_order[f["suite"]])
    warnings.sort(key=lambda f: suite_order[f["suite"]])
    verdict = FailureSeverity.CRITICAL not in severities
    return CheckpointOutcome(
        success=verdict, failures=failures, warnings=warnings,
        suites={name: suite.to_json_dict() for name, suite in suites.items()}, run_name=run_name,
        statistics={"checkpoint": CHECKPOINT, "run_time": run_id.run_time.isoformat(),
                    "checkpoint_success": bool(result.success),
                    "max_severity_failure": max((s.value for s in severities if s is not None),
                                                key=lambda v: ["info", "warning", "critical"].index(v), default=None),
                    "assets": sorted(suites), "expectations": sum(len(s.expectations) for s in suites.values())},
    )


def _build_docs(context: Any, result: Any) -> None:
    """Add this run to the Data Docs site, each page naming its Data Source and asset. GX's page
    header reads the asset from the result's batch spec, which fluent pandas assets leave without
    it ("Data asset: None"); each suite is named after its asset, so the result says which.

    The site gets a copy of each result whose strings are HTML-escaped (`html_escaped`): GX 1.24
    autoescapes only templates named .html and its templates are .j2, so the values it shows (ids,
    labels, header, file names: whatever a pushed dataset holds) reach the pages as raw HTML. The
    caller's result, and so report.json, keeps the values as the data holds them."""
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    identifiers: list[Any] = []
    for key, validation in result.run_results.items():
        validation = copy.deepcopy(validation)
        for outcome in validation.results:
            outcome.result = html_escaped(outcome.result or {})
            outcome.exception_info = html_escaped(outcome.exception_info or {})
        spec = dict(validation.meta.get("batch_spec") or {})
        validation.meta["batch_spec"] = {**spec, "datasource": DATA_SOURCE, "data_asset_name": validation.suite_name}
        context.validation_results_store.set(key, validation)
        identifiers += [key, ExpectationSuiteIdentifier(name=validation.suite_name)]
    context.build_data_docs(resource_identifiers=identifiers, build_index=True)


def html_escaped(value: Any) -> Any:
    """``value`` with every string in it (dict keys included, at any depth) HTML-escaped."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {html_escaped(k): html_escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(html_escaped(v) for v in value)
    return value


def _exception_message(info: dict) -> str | None:
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return str(value["exception_message"])
    return None


def plain(value: Any) -> Any:
    """numpy/pandas scalars and NaN -> JSON-able Python values; whole floats -> ints."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _finding(table: Table, check: Any, result: dict, exception: dict) -> dict:
    kwargs = check.kwargs
    column = kwargs.get("column") or (f"{kwargs['column_A']}, {kwargs['column_B']}" if "column_A" in kwargs else None)
    finding: dict[str, Any] = {"suite": table.suite, "expectation": check.expectation, "column": column,
                               "unexpected_count": 0, "examples": [], "message": check.message,
                               "table": table.name}
    error = _exception_message(exception)
    if error is not None:
        finding.update(unexpected_count=1, message=f"{check.message} (could not be evaluated: {error})")
        return finding
    details = result.get("details")
    if isinstance(details, dict):
        return _custom_finding(finding, details)
    frame = table.frame
    examples = []
    for item in result.get("partial_unexpected_index_list") or []:
        item = {k: plain(v) for k, v in item.items()}
        example = {c: item.get(c) for c in INDEX_COLUMNS}
        position = item.get(ROW_KEY)  # this table's own row: GX reports it with every unexpected value
        if isinstance(position, int):
            for c in table.example_columns:
                if c in frame.columns:
                    example[c] = plain(frame.iat[position, frame.columns.get_loc(c)])
        if "column_A" in kwargs:
            example["value"] = [item.get(kwargs["column_A"]), item.get(kwargs["column_B"])]
        elif column is not None and column in item and column not in INDEX_COLUMNS:
            example["value"] = item[column]
        examples.append({k: v for k, v in example.items() if v is not None})
    finding.update(unexpected_count=int(result.get("unexpected_count") or len(examples)),
                   element_count=int(result.get("element_count") or len(frame)), examples=examples)
    return finding


def _custom_finding(finding: dict, details: dict) -> dict:
    """What a custom Expectation's `_validate` returned, as report examples."""
    if "drifted" in details and "cells" in details:  # label shares
        examples = [{k: c[k] for k in ("check", "class", "name", "reference", "observed", "relative_change",
                                       "p_adjusted") if c.get(k) is not None} for c in details["drifted"]]
        finding.update(unexpected_count=len(examples), element_count=len(details["cells"]), examples=examples,
                       window=details.get("window"), rows=details.get("n"))
    elif "statistic" in details:  # one image statistic
        example = {"statistic": details["statistic"], "reference": details["reference_mean"],
                   "observed": details["mean"], "lower": details["lower"], "upper": details["upper"],
                   "p_adjusted": details["p_adjusted"]}
        finding.update(unexpected_count=1, element_count=1, examples=[{k: plain(v) for k, v in example.items()}],
                       rows=details.get("n"))
    elif "near_pairs" in details:  # near-duplicates: file, its near copy, the distance in bits
        examples = [{"file": p["file"], "value": p["near"], "distance": p["distance"]} for p in details["near_pairs"]]
        finding.update(unexpected_count=int(details["count"]), element_count=None, examples=examples,
                       between=details["between"], max_distance=details["max_distance"])
    elif "pairs" in details:  # content overlap
        examples = [{k: v for k, v in {"file": p["test"], "row": p.get("row"), "value": p["train"]}.items()
                     if v is not None} for p in details["pairs"]]
        finding.update(unexpected_count=int(details.get("count", len(examples))), element_count=None,
                       examples=examples)
    return finding
