"""The suites as tables: each `Table` is a plain pandas frame plus the expectations GX runs on it.

Nothing here imports GX. Every table carries `row` (CSV line), `Image` and `file` where they make
sense, so GX itself reports the offending rows (`unexpected_index_column_names`). Conditions that
limit a check to some rows are written out (`Check.condition`, a pandas row_condition), never
left to nulls that GX would silently skip.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd

from protein.data import MAX_CSV_BYTES, SAFE_ID, TEST_DIR, TRAIN_DIR, DatasetSource, blank_header_problem
from protein.errors import DataError
from protein.validation.config import ValidationConfig
from protein.validation.drift import CELLS, IMAGE_STATISTICS, profile_shares

EXPECTED_COLUMNS = ["Image", "Label"]
# Stripped cell, as `parse_label_set` reads it: single digits separated by single spaces. Whether
# a digit repeats is a separate expectation, so "1 1" and "10" get different messages.
LABEL_PATTERN = r"^[0-9](?: [0-9])*$"
IMAGE_ID_PATTERN = SAFE_ID.pattern
# GX reports these columns for every unexpected row; every table has them (null where unknown).
INDEX_COLUMNS = ["row", "Image", "file"]


Condition = tuple[str, str, Any]


@dataclass(frozen=True)
class Check:
    expectation: str  # GX expectation type, snake case (a custom one from checkpoint.CUSTOM too)
    kwargs: dict[str, Any]
    message: str  # the rule, in words, for the report and Data Docs
    severity: Literal["critical", "warning"] = "critical"
    # The rows of the table this check reads, ANDed: (column, "==" | "<=" | ">=", value) or
    # (column, "notnull", None). Turned into a GX row_condition; nothing is filtered silently.
    condition: tuple[Condition, ...] = ()


@dataclass
class Table:
    suite: str
    name: str  # rows of the suite's one frame with table == name
    frame: pd.DataFrame
    checks: list[Check]
    example_columns: tuple[str, ...] = ()  # extra columns shown with each unexpected row


@dataclass
class Csv:
    """A CSV as read: `frame` has the header's columns exactly; per data row, its line number in
    the file (the last line, if a quoted field spans lines) and how many fields it had."""

    frame: pd.DataFrame
    header: list[str]
    rows: list[int]
    fields: list[int]

    def column(self, name: str) -> list[Any]:
        return self.frame[name].tolist() if name in self.frame.columns else []


def read_csv(source: DatasetSource, relpath: str) -> tuple[Csv | None, str | None]:
    """Strings as written (BOM and CRLF tolerated; Image and Label stripped, blanks None), or None
    and why the file cannot be read. The csv module, not pandas: pandas silently turns a row with
    one field too many into an index and shifts every column."""
    try:
        raw = source.read_bytes(relpath)
    except DataError as exc:
        return None, str(exc)
    if len(raw) > MAX_CSV_BYTES:
        return None, f"{relpath}: {len(raw):,} bytes is larger than the {MAX_CSV_BYTES:,}-byte limit"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return None, f"{relpath}: not UTF-8 text ({exc.reason} at byte {exc.start})"
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    rows: list[int] = []
    records: list[list[str]] = []
    try:
        for record in reader:
            if header is None:
                if (problem := blank_header_problem(relpath, record)) is not None:
                    return None, problem
                header = [c.strip() for c in record]
                continue
            if not record:
                continue  # blank line
            rows.append(reader.line_num)
            records.append(record)
    except csv.Error as exc:
        return None, f"{relpath} line {reader.line_num}: not a valid CSV ({exc})"
    header = header or []
    columns = _unique_names(header)
    width = len(columns)
    fields = [len(r) for r in records]
    frame = pd.DataFrame([(r + [""] * width)[:width] for r in records], columns=columns, dtype=object)
    for column in ("Image", "Label"):
        if column in frame.columns:
            # None, not "": GX counts None as missing, and the not-null expectations say so.
            frame[column] = [v.strip() or None for v in frame[column]]
    return Csv(frame, header, rows, fields), None


def _unique_names(names: list[str]) -> list[str]:
    """Repeated header names get a suffix, as pandas would: a frame needs distinct columns."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}.{count}" if count else name)
    return out


def csv_failure(suite: str, relpath: str, problem: str) -> dict:
    return {"suite": suite, "expectation": "csv_readable", "column": None, "unexpected_count": 1,
            "examples": [{"file": relpath}], "message": problem, "table": relpath}


def _frame(records: dict[str, list[Any]]) -> pd.DataFrame:
    return pd.DataFrame(records, dtype=object)


def header_table(suite: str, name: str, relpath: str, table: Csv, config: ValidationConfig | None) -> Table:
    """The file as a whole: its header and, for train.csv, its row count."""
    header = ",".join(table.header)
    frame = _frame({"row": [1], "Image": [None], "file": [relpath], "header": [header], "rows": [len(table.rows)]})
    expected = ",".join(EXPECTED_COLUMNS)
    checks = [Check("expect_column_values_to_be_in_set", {"column": "header", "value_set": [expected]},
                    f"{relpath} must have exactly the columns {','.join(EXPECTED_COLUMNS)}")]
    if config is not None:
        checks.append(Check("expect_column_values_to_be_between",
                            {"column": "rows", "min_value": config.min_rows, "max_value": config.max_rows},
                            f"{relpath} must have {config.min_rows:,} to {config.max_rows:,} data rows"))
    return Table(suite, name, frame, checks)


def labels_tables(table: Csv, config: ValidationConfig) -> list[Table]:
    frame, rows = table.frame, table.rows
    ids = table.column("Image") or [None] * len(frame)
    labels = table.column("Label") or [None] * len(frame)
    width = len(table.header)
    label_regex = re.compile(LABEL_PATTERN)
    derived = _frame({
        "row": rows, "Image": ids, "file": [None] * len(rows), "Label": labels, "fields": table.fields,
        # Only meaningful where the Label matches its pattern; the condition below says so.
        "label_syntax_ok": [isinstance(v, str) and bool(label_regex.match(v)) for v in labels],
        "label_ids_distinct": [isinstance(v, str) and len(set(v.split(" "))) == len(v.split(" ")) for v in labels],
    })
    checks = [Check("expect_column_values_to_be_in_set", {"column": "fields", "value_set": [width]},
                    f"every row has as many fields as the header ({width})")]
    if "Image" in frame.columns:
        checks += [
            Check("expect_column_values_to_not_be_null", {"column": "Image"}, "every row needs an Image id"),
            Check("expect_column_values_to_be_unique", {"column": "Image"}, "each Image id must appear once"),
            Check("expect_column_values_to_match_regex", {"column": "Image", "regex": IMAGE_ID_PATTERN},
                  "Image ids must be letters, digits, '_' or '-' (no path separators or '..'), at most 128",
                  condition=(("Image", "notnull", None),)),
        ]
    if "Label" in frame.columns:
        checks += [
            Check("expect_column_values_to_not_be_null", {"column": "Label"}, "every row needs a Label"),
            Check("expect_column_values_to_match_regex", {"column": "Label", "regex": LABEL_PATTERN},
                  "Label must be class ids 0-9 separated by single spaces", condition=(("Label", "notnull", None),)),
            Check("expect_column_values_to_be_in_set", {"column": "label_ids_distinct", "value_set": [True]},
                  "a Label names each class once (labels are a set)", condition=(("label_syntax_ok", "==", True),)),
        ]
    return [header_table("labels", "labels.train_csv", "train.csv", table, config),
            Table("labels", "labels.rows", derived, checks, ("Label",))]


def listed_ids(table: Csv | None) -> list[tuple[int, str]]:
    """(CSV line, id) for the first occurrence of each safe id; the rest is the labels suite's business."""
    if table is None or "Image" not in table.frame.columns:
        # No Image column (a file without its header row reads its first data row as the header): no
        # id is listed, and the header expectation is what reports the file.
        return []
    seen: set[str] = set()
    out: list[tuple[int, str]] = []
    for row, image_id in zip(table.rows, table.column("Image"), strict=True):
        if isinstance(image_id, str) and SAFE_ID.match(image_id) and image_id not in seen:
            seen.add(image_id)
            out.append((row, image_id))
    return out


def _image_id(name: str) -> str:
    return name[: -len(".png")] if name.endswith(".png") else name


def _listing_frame(folder: str, listed: list[tuple[int, str]], present: list[str],
                   listed_column: str, exists_column: str) -> pd.DataFrame:
    """One row per listed id (does its file exist?) plus one per file nobody listed."""
    names = set(present)
    wanted = {f"{image_id}.png" for _, image_id in listed}
    records = [(row, image_id, f"{folder}/{image_id}.png", True, f"{image_id}.png" in names)
               for row, image_id in listed]
    records += [(None, _image_id(name), f"{folder}/{name}", False, True) for name in present if name not in wanted]
    return pd.DataFrame(records, columns=["row", "Image", "file", listed_column, exists_column], dtype=object)


def required_table(has_train_csv: bool) -> Table:
    frame = _frame({"row": [None], "Image": [None], "file": ["train.csv"], "present": [has_train_csv]})
    return Table("files", "files.required", frame, [
        Check("expect_column_values_to_be_in_set", {"column": "present", "value_set": [True]},
              "every dataset needs train.csv")])


def train_files_table(listed: list[tuple[int, str]], present: list[str]) -> Table:
    frame = _listing_frame(TRAIN_DIR, listed, present, "listed", "exists")
    return Table("files", "files.train", frame, [
        Check("expect_column_values_to_be_in_set", {"column": "exists", "value_set": [True]},
              "every image train.csv lists must exist as train/<Image>.png"),
        Check("expect_column_values_to_be_in_set", {"column": "listed", "value_set": [True]},
              "files in train/ that train.csv does not list are ignored", "warning"),
    ])


def sample_tables(table: Csv, present: list[str]) -> list[Table]:
    tables = [header_table("files", "files.sample_submission_csv", "sample_submission.csv", table, None)]
    if "Image" not in table.frame.columns:
        return tables
    frame = _frame({"row": table.rows, "Image": table.column("Image"), "file": [None] * len(table.rows)})
    tables.append(Table("files", "files.sample_submission", frame, [
        Check("expect_column_values_to_not_be_null", {"column": "Image"}, "every sample_submission row needs an id"),
        Check("expect_column_values_to_be_unique", {"column": "Image"}, "sample_submission lists each id once"),
        Check("expect_column_values_to_match_regex", {"column": "Image", "regex": IMAGE_ID_PATTERN},
              "sample_submission ids must be safe ids (letters, digits, '_' or '-')",
              condition=(("Image", "notnull", None),)),
    ]))
    tables.append(test_files_table(listed_ids(table), present))
    return tables


def test_files_table(listed: list[tuple[int, str]], present: list[str]) -> Table:
    frame = _listing_frame(TEST_DIR, listed, present, "in_submission", "in_folder")
    frame["error"] = [
        None if listed == present
        else "listed in sample_submission.csv, missing from test/" if listed
        else "in test/, not listed in sample_submission.csv"
        for listed, present in zip(frame["in_submission"], frame["in_folder"], strict=True)
    ]
    return Table("files", "files.test", frame, [
        Check("expect_column_pair_values_to_be_equal", {"column_A": "in_submission", "column_B": "in_folder"},
              "test/ must hold exactly the images sample_submission.csv lists, one to one"),
    ], ("in_submission", "in_folder", "error"))


def images_table(records: list[dict], config: ValidationConfig) -> Table:
    frame = pd.DataFrame(records, dtype=object)
    size = f"{config.image_size}x{config.image_size}"
    decode_rule = ("images must decode fully, as training decodes them" if config.check_pixels
                   else "images must be complete (end with an IEND chunk; pixels not decoded)")
    # Each check looks only at rows the previous ones admitted, so one fault fails one check.
    read: tuple[Condition, ...] = (("bytes", ">=", 1),)
    png = (*read, ("format", "==", "PNG"))
    return Table("images", "images", frame, [
        Check("expect_column_values_to_not_be_null", {"column": "bytes"}, "every listed image must be readable"),
        Check("expect_column_values_to_be_between", {"column": "bytes", "min_value": 1,
                                                     "max_value": config.max_image_bytes},
              f"image files must hold 1 to {config.max_image_bytes:,} bytes (larger ones are not read)",
              condition=(("bytes", "notnull", None),)),
        Check("expect_column_values_to_be_in_set", {"column": "format", "value_set": ["PNG"]},
              "images must be PNG files", condition=(*read, ("bytes", "<=", config.max_image_bytes))),
        Check("expect_column_values_to_be_in_set", {"column": "mode", "value_set": ["RGB"]},
              "images must be RGB (3 channels, no alpha, no palette)", condition=png),
        Check("expect_column_values_to_be_in_set", {"column": "bit_depth", "value_set": [8]},
              "images must have 8 bits per channel", condition=png),
        Check("expect_column_values_to_be_in_set", {"column": "size", "value_set": [size]},
              f"images must be {size} pixels", condition=png),
        Check("expect_png_to_decode", {"column": "decodes", "value_set": [True]}, decode_rule,
              condition=(*png, ("mode", "==", "RGB"), ("bit_depth", "==", 8))),
    ], ("error",))


def integrity_table(records: list[dict], config: ValidationConfig) -> Table:
    """Leakage, duplicates, near-duplicates and blank images, from the hashes of the image pass. Without
    decoded pixels there are no content hashes: only the id check runs (and the report says so)."""
    frame = pd.DataFrame(records, dtype=object)
    checks = [
        Check("expect_column_values_to_be_null", {"column": "same_id_in_train"},
              "a test id must not also be a train id (leakage)", condition=(("split", "==", "test"),)),
    ]
    if config.check_pixels:
        checks += [
            Check("expect_no_content_overlap_between_splits", {},
                  "a test image must not have the same content as a train image (leakage)"),
            Check("expect_column_values_to_be_null", {"column": "duplicate_of"},
                  "train images should not repeat another train image's content", "warning",
                  condition=(("split", "==", "train"),)),
            Check("expect_column_values_to_be_in_set", {"column": "constant", "value_set": [False]},
                  "images should not be blank (every pixel the same value)", "warning",
                  condition=(("constant", "notnull", None),)),
        ]
        distance = config.near_duplicate_max_distance
        # Warnings: a near copy may be a second field of the same sample; exact copies fail above.
        checks += [Check("expect_no_near_duplicate_images", {"max_distance": distance, "between": between},
                         f"{rule} should not be near copies (difference hashes within {distance} of 64 bits, "
                         "pixels not identical)", "warning")
                   for between, rule in (("train and test", "a test image and a train image"),
                                         ("within train", "two train images"))]
    return Table("integrity", "integrity", frame, checks, ("split", "error"))


def drift_severity(n: int, config: ValidationConfig) -> Literal["critical", "warning"]:
    # Tiny development sets drift by chance; they are reported but can never fail.
    return "critical" if config.drift_action == "fail" and n >= config.min_rows_for_drift else "warning"


def drift_table(rows: list[dict], reference: dict, config: ValidationConfig, new_rows: bool) -> Table:
    """One row per usable labelled image (canonical labels, and whether it is new since the
    reference); label drift of all rows and, when the reference knows its rows, of the new ones."""
    frame = pd.DataFrame(rows, columns=["row", "Image", "file", "Label", "new"], dtype=object)
    where = f"reference profile ({reference.get('source', 'given')}, n={reference.get('n', '?')})"
    common = {"column": "Label", "reference_shares": [float(v) for v in profile_shares(reference)],
              "reference_n": int(reference["n"]), "reference_source": where, "alpha": config.drift_alpha,
              "min_relative_change": config.drift_min_relative_change,
              "min_absolute_change": config.drift_min_absolute_change}
    rule = (f"class shares and labels-per-image shares of {{}} must match the {where}: flagged when a Holm-corrected "
            f"two-proportion test over the {len(CELLS)} shares gives p <= {config.drift_alpha} and the share moved "
            f"by at least {config.drift_min_relative_change:.0%} of its reference value or "
            f"{config.drift_min_absolute_change * 100:.0f} points, whichever is smaller")
    checks = [Check("expect_label_shares_within_reference_bounds", {**common, "window": "all rows"},
                    rule.format("all rows"), drift_severity(len(frame), config))]
    if new_rows:
        added = int(frame["new"].sum()) if len(frame) else 0
        if added:
            checks.append(Check("expect_label_shares_within_reference_bounds",
                                {**common, "window": "rows added since the reference"},
                                rule.format("the rows added since the reference"), drift_severity(added, config),
                                condition=(("new", "==", True),)))
    return Table("distribution", "drift", frame, checks)


def image_statistics_table(records: list[dict], reference: dict, config: ValidationConfig) -> Table:
    """Per decoded train image, its intensity statistics; each statistic's mean must lie within the
    reference's bounds (when the reference has image statistics: a dataset accepted or promoted)."""
    columns = ["row", "Image", "file", "split", *IMAGE_STATISTICS]
    frame = pd.DataFrame([{c: r.get(c) for c in columns} for r in records if r.get("decodes") and r.get(
        IMAGE_STATISTICS[0]) is not None], columns=columns, dtype=object)
    checks = []
    stats = reference.get("image_statistics") or {}
    severity = drift_severity(int((frame["split"] == "train").sum()) if len(frame) else 0, config)
    for name in IMAGE_STATISTICS:
        ref = stats.get(name)
        if not isinstance(ref, dict):
            continue
        checks.append(Check(
            "expect_image_statistic_within_reference_bounds",
            {"column": name, "reference_mean": float(ref["mean"]), "reference_std": float(ref["std"]),
             "reference_n": int(ref["n"]), "tests": len(IMAGE_STATISTICS), "alpha": config.drift_alpha,
             "min_relative_change": config.image_drift_min_relative_change},
            f"the mean {name} of train images must stay within the reference's bounds "
            f"({float(ref['mean']):.4f} over {int(ref['n']):,} images, at least "
            f"{config.image_drift_min_relative_change:.0%} change and significant to flag)",
            severity, condition=(("split", "==", "train"),)))
    return Table("distribution", "image_statistics", frame, checks)


def readable_table(files: list[tuple[str, str | None]]) -> Table:
    frame = _frame({"row": [None] * len(files), "Image": [None] * len(files), "file": [f for f, _ in files],
                    "error": [p for _, p in files]})
    suite = "labels"
    return Table(suite, "labels.csv_readable", frame, [
        Check("expect_column_values_to_be_null", {"column": "error"},
              "train.csv and sample_submission.csv must be readable UTF-8 CSV files")], ("error",))
