"""Great Expectations as the engine: every suite in one Checkpoint, one run id, one verdict.

All tables go into one pandas frame with a `table` column; each expectation reads its own
table's rows through an explicit `row_condition`. One validation definition per suite (labels,
files, images, integrity, distribution, and a `.warnings` suite per suite for checks that only
warn), one Checkpoint over them, run once with one run id; with a project folder, the Checkpoint's
`UpdateDataDocsAction` adds this run to a Data Docs site that keeps earlier runs (their results
are synced from the store). The verdict is GX's: the run passes when every critical suite does.

Checks beyond built-in expectations are subclasses with their own `description`, so Data Docs
say what they mean: PNG integrity (the training decoder's verdict), content leakage, label drift.
GX is imported inside functions only: importing it costs seconds.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from protein.validation.config import MAX_EXAMPLES, SUITES
from protein.validation.suites import INDEX_COLUMNS, Condition, Table

# Columns compared with numbers in row conditions: numeric so pandas can compare them with nulls.
ROW_KEY = "table_row"
NUMERIC_COLUMNS = ("row", "bytes", "bit_depth", "width", "height", "rows", "fields")


@dataclass
class CheckpointOutcome:
    success: bool
    failures: list[dict]
    warnings: list[dict]
    suites: dict[str, dict]  # suite name -> the suite's JSON, as GX ran it
    run_name: str
    statistics: dict[str, Any]


@functools.cache
def custom_expectations() -> dict[str, type]:
    """Custom Expectation classes (created once per process: GX registers each class by name)."""
    import great_expectations.expectations as gxe

    class ExpectPngToDecode(gxe.ExpectColumnValuesToBeInSet):
        """Every image decodes with protein.data.decode_png, the decoder training uses."""

        description: str = ("PNG integrity: every chunk matches its CRC, the file ends at its IEND chunk, and "
                            "protein.data.decode_png (the decoder training and prediction use) decodes every pixel")

    class ExpectImageContentNotInOtherSplit(gxe.ExpectColumnValuesToBeNull):
        """No test image has the pixel content of a train image."""

        description: str = ("Leakage: the SHA-256 of a test image's decoded pixels must not equal that of any train "
                            "image; the value shown is the train file with the same content")

    class ExpectLabelSharesNotToDrift(gxe.ExpectColumnValuesToBeInSet):
        """No class share or labels-per-image share drifted from the reference profile."""

        description: str = ("Label drift: for each class share and labels-per-image share, a two-proportion z-test "
                            "(pooled, continuity-corrected) against the reference profile, Holm-corrected over all "
                            "14 shares; a share drifts when significant and moved by at least the configured "
                            "relative change")

    return {"expect_png_to_decode": ExpectPngToDecode,
            "expect_image_content_not_in_other_split": ExpectImageContentNotInOtherSplit,
            "expect_label_shares_not_to_drift": ExpectLabelSharesNotToDrift}


def _expectation_class(name: str) -> type:
    import great_expectations.expectations as gxe

    custom = custom_expectations()
    if name in custom:
        return custom[name]
    return getattr(gxe, "".join(part.capitalize() for part in name.split("_")))


def _row_condition(table: str, condition: tuple[Condition, ...]) -> Any:
    """GX Condition objects: this table's rows, and those the check names."""
    from great_expectations.expectations.row_conditions import AndCondition, Column

    parts = [Column("table") == table]
    for column, op, value in condition:
        col = Column(column)
        parts.append(col.is_not_null() if op == "notnull" else col == value if op == "==" else
                     col <= value if op == "<=" else col >= value)
    return parts[0] if len(parts) == 1 else AndCondition(conditions=parts)


def combined_frame(tables: list[Table]) -> pd.DataFrame:
    frames = []
    for table in tables:
        frame = table.frame.copy()
        for column in INDEX_COLUMNS:
            if column not in frame.columns:
                frame[column] = None
        frame["table"] = table.name
        frame[ROW_KEY] = range(len(frame))
        frames.append(frame)
    wide = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"table": []})
    wide = wide.astype(object)
    for column in NUMERIC_COLUMNS:
        if column in wide.columns:
            wide[column] = pd.to_numeric(wide[column], errors="coerce")
    return wide


def suite_name(table: Table, severity: str) -> str:
    return table.suite if severity == "critical" else f"{table.suite}.warnings"


def run_checkpoint(tables: list[Table], run_name: str, project_dir: Path | None) -> CheckpointOutcome:
    """Run every table's checks in one Checkpoint; with project_dir, a file context there whose
    Data Docs the Checkpoint updates (gx/uncommitted/data_docs/local_site)."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if project_dir is not None:
        context = gx.get_context(mode="file", project_root_dir=str(project_dir))
    else:
        context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    wide = combined_frame(tables)
    batch = context.data_sources.add_pandas("protein").add_dataframe_asset("dataset") \
        .add_batch_definition_whole_dataframe("whole")
    by_table = {t.name: t for t in tables}
    suites: dict[str, Any] = {}
    order = [s for suite in SUITES for s in (suite, f"{suite}.warnings")]
    for table in tables:
        for i, check in enumerate(table.checks):
            name = suite_name(table, check.severity)
            if name not in suites:
                suites[name] = gx.ExpectationSuite(name=name)
            cls = _expectation_class(check.expectation)
            suites[name].add_expectation(cls(**check.kwargs, severity=check.severity, notes=check.message,
                                             row_condition=_row_condition(table.name, check.condition),
                                             meta={"table": table.name, "check": i}))
    definitions = []
    for name in sorted(suites, key=order.index):
        suite = context.suites.add(suites[name])
        definitions.append(context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)))
    actions = [UpdateDataDocsAction(name="update_data_docs")] if project_dir is not None else []
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES,
                     "unexpected_index_column_names": [*INDEX_COLUMNS, ROW_KEY], "return_unexpected_index_query": False}
    checkpoint = context.checkpoints.add(gx.Checkpoint(name="protein-validation", validation_definitions=definitions,
                                                       actions=actions, result_format=result_format))
    run_id = RunIdentifier(run_name=run_name, run_time=dt.datetime.now(dt.UTC))
    result = checkpoint.run(batch_parameters={"dataframe": wide}, run_id=run_id)

    failures: list[dict] = []
    warnings: list[dict] = []
    critical_ok = True
    for validation in result.run_results.values():
        suite = validation.suite_name
        if not suite.endswith(".warnings") and not validation.success:
            critical_ok = False
        for outcome in validation.results:
            if outcome.success:
                continue
            meta = outcome.expectation_config.meta
            table = by_table[meta["table"]]
            check = table.checks[int(meta["check"])]
            finding = _finding(table, check, outcome.result or {}, outcome.exception_info or {})
            (failures if check.severity == "critical" else warnings).append(finding)
    suite_order = {name: i for i, name in enumerate(SUITES)}
    failures.sort(key=lambda f: suite_order[f["suite"]])
    warnings.sort(key=lambda f: suite_order[f["suite"]])
    return CheckpointOutcome(
        success=critical_ok, failures=failures, warnings=warnings,
        suites={name: suite.to_json_dict() for name, suite in suites.items()}, run_name=run_name,
        statistics={"checkpoint": "protein-validation", "run_time": run_id.run_time.isoformat(),
                    "checkpoint_success": bool(result.success), "expectations": sum(
                        len(s.expectations) for s in suites.values())},
    )


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
