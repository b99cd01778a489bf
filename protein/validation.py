"""Data validation with Great Expectations: nothing is trained on data that fails it.

Every check is a GX expectation run on a pandas table built here, one ephemeral context per call:

- labels: train.csv as read (exact columns, row count, ids not null, unique and safe, label
  syntax), plus a derived per-row table: field count (ragged rows) and whether each label set
  names every class once.
- files: every listed image exists; unlisted files are reported (warning); test/ matches
  sample_submission.csv one to one.
- images: one row per listed image from its PNG header (IHDR) and trailer (IEND) - format,
  mode, bit depth, size - and, with ``check_pixels``, a full decode in the same single read.
- distribution: class shares and labels-per-image shares against a reference profile (the
  last accepted dataset's, else `REFERENCE_PROFILE` from the real train.csv).

A failed expectation is data, not an exception: it lands in `ValidationReport.failures` with its
unexpected examples (CSV line numbers as ``row``, ids, file names). GX is imported inside
functions only, because importing it costs seconds and `protein` must stay cheap to import.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import math
import mimetypes
import multiprocessing
import os
import re
import secrets
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from PIL import Image

from protein.atomic import write_text_atomic
from protein.data import (
    MAX_CSV_BYTES,
    MAX_IMAGE_PIXELS,
    SAFE_ID,
    SAMPLE_SUBMISSION_CSV,
    TEST_DIR,
    TRAIN_CSV,
    TRAIN_DIR,
    DatasetSource,
    FolderSource,
    fingerprint,
)
from protein.errors import DataError
from protein.labels import LABELS, NUM_CLASSES, parse_label_set

log = logging.getLogger(__name__)

SUITES = ("labels", "files", "images", "distribution")
EXPECTED_COLUMNS = ["Image", "Label"]
# Stripped cell, as `parse_label_set` reads it: single digits separated by single spaces. Whether
# a digit repeats is a separate expectation, so "1 1" and "10" get different messages.
LABEL_PATTERN = r"^[0-9](?: [0-9])*$"
IMAGE_ID_PATTERN = SAFE_ID.pattern
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Signature (8) + IHDR length and type (8) + IHDR body (13) + CRC (4).
PNG_HEADER_BYTES = 33
# Every complete PNG ends with this empty IEND chunk; a file cut short does not.
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_COLOR_TYPES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
OTHER_FORMATS = ((b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                 (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"))
LABELS_PER_IMAGE_BUCKETS = ("1", "2", "3", "4+")
MAX_EXAMPLES = 20
SUMMARY_EXAMPLES = 5
# Below this many images the per-image cost is so small that starting processes costs more.
POOL_MIN_IMAGES_DECODE = 64
POOL_MIN_IMAGES_HEADERS = 4096
MAX_WORKERS = 8
STORE_PREFIX = "validation"
REFERENCE_PROFILE_KEY = f"{STORE_PREFIX}/reference_profile.json"
DOCS_SITE = "protein_validation"
_STORE_KEY_PART = re.compile(r"[A-Za-z0-9._=-]+")

# Real train.csv statistics from shared/data/README.md (19,236 images).
_REAL_ROWS = 19_236
_REAL_CLASS_COUNTS = (2088, 1752, 2542, 1977, 9066, 1109, 5711, 2629, 1037, 1278)
_REAL_LABELS_PER_IMAGE = {"1": 10_639, "2": 7_299, "3": 1_240, "4+": 58}
REFERENCE_PROFILE: dict[str, Any] = {
    "n": _REAL_ROWS,
    "class_share": [round(c / _REAL_ROWS, 6) for c in _REAL_CLASS_COUNTS],
    "labels_per_image_share": {k: round(v / _REAL_ROWS, 6) for k, v in _REAL_LABELS_PER_IMAGE.items()},
    "source": "real train.csv statistics (shared/data/README.md)",
}

IMAGE_COLUMNS = ("row", "split", "Image", "file", "bytes", "format", "mode", "bit_depth", "width", "height",
                 "size", "decodes", "error")


@dataclass(frozen=True)
class ValidationConfig:
    image_size: int = 512
    min_rows: int = 1
    max_rows: int = 1_000_000
    check_pixels: bool = True
    drift_tolerance: float = 0.05
    drift_action: Literal["fail", "warn"] = "fail"
    min_rows_for_drift: int = 200

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if not 0 <= self.min_rows <= self.max_rows:
            raise ValueError(f"need 0 <= min_rows <= max_rows, got {self.min_rows}, {self.max_rows}")
        if not 0 < self.drift_tolerance < 1:
            raise ValueError(f"drift_tolerance is a share between 0 and 1, got {self.drift_tolerance}")
        if self.drift_action not in ("fail", "warn"):
            raise ValueError(f"drift_action must be 'fail' or 'warn', got {self.drift_action!r}")


@dataclass
class ValidationReport:
    success: bool
    data_fingerprint: str
    dataset: str
    failures: list[dict]
    warnings: list[dict]
    profile: dict
    statistics: dict
    seconds: float
    docs_path: str | None = None
    docs_uri: str | None = None
    report_uri: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_lines(self) -> list[str]:
        """One short line per failed expectation: what, where, how many, and a few examples."""
        return [_describe(f) for f in self.failures]

    def warning_lines(self) -> list[str]:
        return [f"warning: {_describe(w)}" for w in self.warnings]


# ----------------------------------------------------------------------------------------------
# Profiles


def profile_labels(label_sets: list[frozenset[int]]) -> dict:
    """Share of images carrying each class, and share of images with 1, 2, 3, 4+ labels."""
    n = len(label_sets)
    class_counts = [0] * NUM_CLASSES
    per_image = dict.fromkeys(LABELS_PER_IMAGE_BUCKETS, 0)
    for label_set in label_sets:
        for class_id in label_set:
            class_counts[class_id] += 1
        per_image[_bucket(len(label_set))] += 1
    return {
        "n": n,
        "class_share": [round(c / n, 6) if n else 0.0 for c in class_counts],
        "labels_per_image_share": {k: round(v / n, 6) if n else 0.0 for k, v in per_image.items()},
    }


def _bucket(count: int) -> str:
    return "4+" if count >= 4 else str(count)


def _check_profile(profile: Any, where: str) -> dict:
    """A usable reference profile, or ValueError saying what is wrong with it."""
    if not isinstance(profile, dict):
        raise ValueError(f"{where}: a profile is a JSON object, got {type(profile).__name__}")
    shares = profile.get("class_share")
    per_image = profile.get("labels_per_image_share")
    if not isinstance(shares, list) or len(shares) != NUM_CLASSES or not all(_is_share(s) for s in shares):
        raise ValueError(f"{where}: class_share must be {NUM_CLASSES} numbers between 0 and 1")
    if not isinstance(per_image, dict) or set(per_image) != set(LABELS_PER_IMAGE_BUCKETS) or not all(
        _is_share(v) for v in per_image.values()
    ):
        raise ValueError(f"{where}: labels_per_image_share needs keys {', '.join(LABELS_PER_IMAGE_BUCKETS)}")
    return profile


def _is_share(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


# ----------------------------------------------------------------------------------------------
# Tables: plain pandas, no GX. Each table carries the expectations GX runs on it.


@dataclass(frozen=True)
class _Check:
    expectation: str  # GX expectation type, snake case
    kwargs: dict[str, Any]
    message: str  # the rule, in words, for the report and Data Docs
    severity: Literal["critical", "warning"] = "critical"


@dataclass
class _Table:
    suite: str
    name: str  # GX asset and suite name; also part of Data Docs file names, so store-key safe
    frame: pd.DataFrame  # what GX validates; positional RangeIndex
    checks: list[_Check]
    example_columns: tuple[str, ...]
    # Per-row context for examples when `frame` must stay exactly as read (train.csv columns).
    context: pd.DataFrame | None = None
    value_key: str = "value"  # key of the offending value in each example


@dataclass
class _Csv:
    """A CSV as read: `frame` has the header's columns exactly; per data row, its line number in
    the file (the last line, if a quoted field spans lines) and how many fields it had (a ragged
    row is padded or cut to the header's width)."""

    frame: pd.DataFrame
    rows: list[int]
    fields: list[int]

    def column(self, name: str) -> list[Any]:
        return self.frame[name].tolist() if name in self.frame.columns else []


def _read_csv(source: DatasetSource, relpath: str) -> tuple[_Csv | None, str | None]:
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
            if not record:
                continue  # blank line
            if header is None:
                header = _unique_names([c.strip() for c in record])
                continue
            rows.append(reader.line_num)
            records.append(record)
    except csv.Error as exc:
        return None, f"{relpath} line {reader.line_num}: not a valid CSV ({exc})"
    header = header or []  # no header at all: the columns expectation says what is missing
    width = len(header)
    fields = [len(r) for r in records]
    frame = pd.DataFrame([(r + [""] * width)[:width] for r in records], columns=header, dtype=object)
    for column in ("Image", "Label"):
        if column in frame.columns:
            stripped = [v.strip() for v in frame[column]]
            # None, not "": GX counts None as missing in every expectation.
            frame[column] = [v or None for v in stripped]
    return _Csv(frame, rows, fields), None


def _unique_names(names: list[str]) -> list[str]:
    """Repeated header names get a suffix, as pandas would: a frame needs distinct columns."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        count = seen.get(name, 0)
        seen[name] = count + 1
        out.append(f"{name}.{count}" if count else name)
    return out


def _csv_failure(suite: str, relpath: str, problem: str) -> dict:
    return {"suite": suite, "expectation": "csv_readable", "column": None, "unexpected_count": 1,
            "examples": [{"file": relpath}], "message": problem, "table": relpath}


def _column(table: _Csv | None, name: str) -> list[Any]:
    return table.column(name) if table is not None else []


def _labels_tables(table: _Csv, config: ValidationConfig) -> list[_Table]:
    frame, rows = table.frame, table.rows
    checks = [
        _Check("expect_table_columns_to_match_ordered_list", {"column_list": EXPECTED_COLUMNS},
               "train.csv must have exactly the columns Image,Label"),
        _Check("expect_table_row_count_to_be_between", {"min_value": config.min_rows, "max_value": config.max_rows},
               f"train.csv must have {config.min_rows:,} to {config.max_rows:,} data rows"),
    ]
    if "Image" in frame.columns:
        checks += [
            _Check("expect_column_values_to_not_be_null", {"column": "Image"}, "every row needs an Image id"),
            _Check("expect_column_values_to_be_unique", {"column": "Image"}, "each Image id must appear once"),
            _Check("expect_column_values_to_match_regex", {"column": "Image", "regex": IMAGE_ID_PATTERN},
                   "Image ids must be letters, digits, '_' or '-' (no path separators or '..'), at most 128"),
        ]
    if "Label" in frame.columns:
        checks += [
            _Check("expect_column_values_to_not_be_null", {"column": "Label"}, "every row needs a Label"),
            _Check("expect_column_values_to_match_regex", {"column": "Label", "regex": LABEL_PATTERN},
                   "Label must be class ids 0-9 separated by single spaces"),
        ]
    ids = table.column("Image") or [None] * len(frame)
    context = pd.DataFrame({"row": rows, "Image": ids}, dtype=object)
    tables = [_Table("labels", "labels.train_csv", frame, checks, ("row", "Image"), context)]
    # Facts about each row that are not columns of the file, so they live in a second table.
    derived = pd.DataFrame({"row": rows, "Image": ids, "fields": table.fields}, dtype=object)
    derived_checks = [
        _Check("expect_column_values_to_be_in_set", {"column": "fields", "value_set": [len(frame.columns)]},
               f"every row has as many fields as the header ({len(frame.columns)})"),
    ]
    if "Label" in frame.columns:
        label_regex = re.compile(LABEL_PATTERN)
        derived["Label"] = frame["Label"].tolist()
        derived["label_ids_distinct"] = [
            len(set(v.split(" "))) == len(v.split(" ")) if isinstance(v, str) and label_regex.match(v) else None
            for v in derived["Label"]
        ]
        derived_checks.append(
            _Check("expect_column_values_to_be_in_set", {"column": "label_ids_distinct", "value_set": [True]},
                   "a Label names each class once (labels are a set)"))
    tables.append(_Table("labels", "labels.rows", derived, derived_checks, ("row", "Image", "Label")))
    return tables


def _listed_ids(table: _Csv | None) -> list[tuple[int, str]]:
    """(CSV line, id) for the first occurrence of each safe id; the rest is the labels suite's business."""
    if table is None:
        return []
    seen: set[str] = set()
    out: list[tuple[int, str]] = []
    for row, image_id in zip(table.rows, _column(table, "Image"), strict=True):
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
    # Object dtype keeps row numbers ints next to None (unlisted files have no row).
    return pd.DataFrame(records, columns=["row", "Image", "file", listed_column, exists_column],
                        dtype=object).astype({listed_column: bool, exists_column: bool})


def _train_files_table(listed: list[tuple[int, str]], present: list[str]) -> _Table:
    frame = _listing_frame(TRAIN_DIR, listed, present, "listed", "exists")
    return _Table("files", "files.train", frame, [
        _Check("expect_column_values_to_be_in_set", {"column": "exists", "value_set": [True]},
               "every image train.csv lists must exist as train/<Image>.png"),
        _Check("expect_column_values_to_be_in_set", {"column": "listed", "value_set": [True]},
               "files in train/ that train.csv does not list are ignored", "warning"),
    ], ("row", "Image", "file"))


def _sample_tables(table: _Csv, present: list[str]) -> list[_Table]:
    sample, rows = table.frame, table.rows
    checks = [_Check("expect_table_columns_to_match_ordered_list", {"column_list": EXPECTED_COLUMNS},
                     "sample_submission.csv must have exactly the columns Image,Label")]
    if "Image" not in sample.columns:
        return [_Table("files", "files.sample_submission", sample, checks, ("row",), pd.DataFrame({"row": rows}))]
    checks += [
        _Check("expect_column_values_to_not_be_null", {"column": "Image"}, "every sample_submission row needs an id"),
        _Check("expect_column_values_to_be_unique", {"column": "Image"}, "sample_submission lists each id once"),
        _Check("expect_column_values_to_match_regex", {"column": "Image", "regex": IMAGE_ID_PATTERN},
               "sample_submission ids must be safe ids (letters, digits, '_' or '-')"),
    ]
    context = pd.DataFrame({"row": rows, "Image": sample["Image"].tolist()}, dtype=object)
    return [_Table("files", "files.sample_submission", sample, checks, ("row", "Image"), context),
            _test_files_table(_listed_ids(table), present)]


def _test_files_table(listed: list[tuple[int, str]], present: list[str]) -> _Table:
    frame = _listing_frame(TEST_DIR, listed, present, "in_submission", "in_folder")
    frame["error"] = [
        None if listed == present
        else "listed in sample_submission.csv, missing from test/" if listed
        else "in test/, not listed in sample_submission.csv"
        for listed, present in zip(frame["in_submission"], frame["in_folder"], strict=True)
    ]
    return _Table("files", "files.test", frame, [
        _Check("expect_column_pair_values_to_be_equal", {"column_A": "in_submission", "column_B": "in_folder"},
               "test/ must hold exactly the images sample_submission.csv lists, one to one"),
    ], ("row", "Image", "file", "in_submission", "in_folder", "error"))


def _images_table(records: list[dict], config: ValidationConfig) -> _Table:
    frame = pd.DataFrame(records, columns=list(IMAGE_COLUMNS), dtype=object)
    size = f"{config.image_size}x{config.image_size}"
    checks = [
        _Check("expect_column_values_to_be_between", {"column": "bytes", "min_value": 1},
               "image files must not be empty"),
        _Check("expect_column_values_to_be_in_set", {"column": "format", "value_set": ["PNG"]},
               "images must be PNG files"),
        _Check("expect_column_values_to_be_in_set", {"column": "mode", "value_set": ["RGB"]},
               "images must be RGB (3 channels, no alpha)"),
        _Check("expect_column_values_to_be_in_set", {"column": "bit_depth", "value_set": [8]},
               "images must have 8 bits per channel"),
        _Check("expect_column_values_to_be_in_set", {"column": "size", "value_set": [size]},
               f"images must be {size} pixels"),
        _Check("expect_column_values_to_be_in_set", {"column": "decodes", "value_set": [True]},
               "images must be complete: fully decodable" if config.check_pixels
               else "images must be complete (end with an IEND chunk; pixels not decoded)"),
    ]
    return _Table("images", "images", frame, checks, ("row", "file", "error"))


def _distribution_table(profile: dict, reference: dict, config: ValidationConfig) -> _Table:
    records = []
    for class_id, name in enumerate(LABELS):
        ref, obs = float(reference["class_share"][class_id]), float(profile["class_share"][class_id])
        records.append({"check": f"class {class_id}", "class": class_id, "name": name, "reference": ref,
                        "observed": obs, "class_shift": round(obs - ref, 6), "labels_per_image_shift": None})
    for bucket in LABELS_PER_IMAGE_BUCKETS:
        ref = float(reference["labels_per_image_share"][bucket])
        obs = float(profile["labels_per_image_share"][bucket])
        records.append({"check": f"{bucket} labels per image", "class": None, "name": None,
                        "reference": ref, "observed": obs, "class_shift": None,
                        "labels_per_image_shift": round(obs - ref, 6)})
    frame = pd.DataFrame(records, dtype=object)
    tol = config.drift_tolerance
    # Tiny development sets drift by chance; they are reported but can never fail.
    severity = "critical" if config.drift_action == "fail" and profile["n"] >= config.min_rows_for_drift else "warning"
    where = f"reference profile ({reference.get('source', 'given')}, n={reference.get('n', '?')})"
    return _Table("distribution", "distribution", frame, [
        _Check("expect_column_values_to_be_between", {"column": "class_shift", "min_value": -tol, "max_value": tol},
               f"each class's share of images must stay within {tol * 100:.1f} points of the {where}", severity),
        _Check("expect_column_values_to_be_between",
               {"column": "labels_per_image_shift", "min_value": -tol, "max_value": tol},
               f"the share of images with 1, 2, 3, 4+ labels must stay within {tol * 100:.1f} points of the {where}",
               severity),
    ], ("check", "class", "name", "reference", "observed"), value_key="shift")


# ----------------------------------------------------------------------------------------------
# Images: one read per file, in worker processes when there are many.


class _ImageReader:
    """Reads what the checks need from one image: the header and trailer, or every byte when
    pixels are checked (then the decode reuses that read)."""

    def __init__(self, source: DatasetSource, check_pixels: bool) -> None:
        self.source = source
        self.check_pixels = check_pixels

    def _read(self, relpath: str) -> tuple[int, bytes, bytes]:
        """(size, head, tail) where head is the whole file when pixels are checked."""
        source = self.source
        if isinstance(source, FolderSource):
            path = source.root / relpath
            # A symlink may point anywhere; refuse to read outside the dataset folder.
            if path.is_symlink():
                resolved = path.resolve()
                if source.root not in resolved.parents:
                    raise DataError(f"points outside the dataset folder ({resolved})")
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if self.check_pixels:
                    data = f.read()
                    return len(data), data, data[-len(PNG_TRAILER):]
                head = f.read(PNG_HEADER_BYTES)
                if size <= PNG_HEADER_BYTES:
                    return size, head, head[-len(PNG_TRAILER):]
                f.seek(max(size - len(PNG_TRAILER), 0))
                return size, head, f.read(len(PNG_TRAILER))
        # Zip members (seeking inside a compressed member means decompressing up to it anyway)
        # and any other source: read it all; ZipSource keeps one handle per worker process.
        data = source.read_bytes(relpath)
        return len(data), data, data[-len(PNG_TRAILER):]

    def inspect(self, job: tuple[str, int, str, str]) -> dict:
        split, row, image_id, relpath = job
        record: dict[str, Any] = dict.fromkeys(IMAGE_COLUMNS)
        record.update(row=row, split=split, Image=image_id, file=relpath)
        try:
            size, head, tail = self._read(relpath)
        except (OSError, DataError, zipfile.BadZipFile, KeyError) as exc:
            record.update(format="unreadable", error=f"cannot read: {exc}")
            return record
        record["bytes"] = size
        if size == 0:
            record["error"] = "empty file"
            return record
        record.update(_png_header(head))
        if record["format"] != "PNG":
            return record
        if tail != PNG_TRAILER:
            # Either the file stops early or something follows the image: tell which.
            trailing = len(head) == size and PNG_TRAILER in head  # whole file read: look inside
            error = ("data after the IEND chunk (trailing garbage)" if trailing
                     else "does not end with an IEND chunk: truncated")
            record.update(decodes=False, error=error)
            return record
        if not self.check_pixels or record["width"] * record["height"] > MAX_IMAGE_PIXELS:
            record["decodes"] = True if not self.check_pixels else None
            return record
        problem = _broken_chunk(head)
        if problem is not None:
            record.update(decodes=False, error=problem)
            return record
        try:
            with Image.open(io.BytesIO(head)) as image:
                image.load()
            record["decodes"] = True
        except Exception as exc:  # any decoder error means training could not use the file
            record.update(decodes=False, error=f"cannot decode: {exc}")
        return record


def _png_header(head: bytes) -> dict[str, Any]:
    """Format, mode, bit depth and size from the signature and IHDR chunk, without decoding."""
    if not head.startswith(PNG_SIGNATURE):
        name = next((fmt for magic, fmt in OTHER_FORMATS if head.startswith(magic)), "unknown")
        return {"format": name, "error": f"not a PNG (looks like {name})"}
    if len(head) < PNG_HEADER_BYTES or head[8:16] != b"\x00\x00\x00\x0dIHDR":
        return {"format": "corrupt PNG", "error": "no IHDR chunk after the PNG signature"}
    body, crc = head[16:29], struct.unpack(">I", head[29:33])[0]
    if zlib.crc32(head[12:29]) != crc:
        return {"format": "corrupt PNG", "error": "IHDR chunk fails its CRC"}
    width, height, bit_depth, color_type = struct.unpack(">IIBB", body[:10])
    return {"format": "PNG", "mode": PNG_COLOR_TYPES.get(color_type, f"color type {color_type}"),
            "bit_depth": bit_depth, "width": width, "height": height, "size": f"{width}x{height}"}


def _broken_chunk(data: bytes) -> str | None:
    """None if every chunk is whole and matches its CRC up to IEND, else what is wrong. PIL's
    decode does not check CRCs, so a flipped bit in pixel data would otherwise pass."""
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return f"chunk at byte {pos} runs past the end of the file: truncated"
        kind = bytes(view[pos + 4 : pos + 8]).decode("latin-1")
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return f"{kind} chunk at byte {pos} fails its CRC: corrupt"
        if kind == "IEND":
            return None
        pos = end
    return "no IEND chunk: truncated"


_worker_reader: _ImageReader | None = None


def _init_worker(reader: _ImageReader) -> None:
    global _worker_reader
    _worker_reader = reader


def _inspect_in_worker(job: tuple[str, int, str, str]) -> dict:
    assert _worker_reader is not None
    return _worker_reader.inspect(job)


def _inspect_images(reader: _ImageReader, jobs: list[tuple[str, int, str, str]]) -> tuple[list[dict], int]:
    threshold = POOL_MIN_IMAGES_DECODE if reader.check_pixels else POOL_MIN_IMAGES_HEADERS
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    if len(jobs) < threshold or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [reader.inspect(job) for job in jobs], 1
    # Fork: workers only read files and run PIL, and inherit the reader without pickling it.
    context = multiprocessing.get_context("fork")
    chunksize = max(16, len(jobs) // (workers * 8))
    with context.Pool(workers, initializer=_init_worker, initargs=(reader,)) as pool:
        return pool.map(_inspect_in_worker, jobs, chunksize=chunksize), workers


# ----------------------------------------------------------------------------------------------
# GX


def _expectation_class(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _run_gx(tables: list[_Table], docs_dir: Path | None) -> tuple[list[dict], list[dict]]:
    """Run every table's expectations in one ephemeral context; optionally build Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    datasource = context.data_sources.add_pandas("protein")
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_EXAMPLES,
                     "return_unexpected_index_query": False}
    failures: list[dict] = []
    warnings: list[dict] = []
    for table in tables:
        batch = datasource.add_dataframe_asset(table.name).add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(gx.ExpectationSuite(name=table.name))
        for i, check in enumerate(table.checks):
            cls = getattr(gxe, _expectation_class(check.expectation))
            suite.add_expectation(cls(**check.kwargs, severity=check.severity, notes=check.message,
                                      meta={"check": i}))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=table.name, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": table.frame}, result_format=result_format)
        for outcome in result.results:
            if outcome.success:
                continue
            check = table.checks[int(outcome.expectation_config.meta["check"])]
            finding = _finding(table, check, outcome.result or {}, outcome.exception_info or {})
            (failures if check.severity == "critical" else warnings).append(finding)
    if docs_dir is not None:
        context.add_data_docs_site(DOCS_SITE, {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        context.build_data_docs(site_names=[DOCS_SITE])
    order = {name: i for i, name in enumerate(SUITES)}
    failures.sort(key=lambda f: order[f["suite"]])
    warnings.sort(key=lambda f: order[f["suite"]])
    return failures, warnings


def _exception_message(info: dict) -> str | None:
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("exception_message"):
            return str(value["exception_message"])
    return None


def _plain(value: Any) -> Any:
    """numpy/pandas scalars and NaN -> JSON-able Python values."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _finding(table: _Table, check: _Check, result: dict, exception: dict) -> dict:
    kwargs = check.kwargs
    column = kwargs.get("column") or (f"{kwargs['column_A']}, {kwargs['column_B']}" if "column_A" in kwargs else None)
    finding: dict[str, Any] = {"suite": table.suite, "expectation": check.expectation, "column": column,
                               "unexpected_count": 0, "examples": [], "message": check.message,
                               "table": table.name}
    error = _exception_message(exception)
    if error is not None:
        finding.update(unexpected_count=1, message=f"{check.message} (could not be evaluated: {error})")
        return finding
    if "observed_value" in result:
        observed = _plain(result["observed_value"])
        finding.update(unexpected_count=1, examples=[{"observed": observed}],
                       message=f"{check.message}; found {observed}")
        return finding
    context = table.context if table.context is not None else table.frame
    examples = []
    for position in result.get("partial_unexpected_index_list") or []:
        example = {c: _plain(context.at[position, c]) for c in table.example_columns if c in context.columns}
        if "column_A" in kwargs:
            example[table.value_key] = [_plain(table.frame.at[position, kwargs[k]]) for k in ("column_A", "column_B")]
        elif column in table.frame.columns and column not in example:
            example[table.value_key] = _plain(table.frame.at[position, column])
        examples.append({k: v for k, v in example.items() if v is not None})
    finding.update(unexpected_count=int(result.get("unexpected_count") or len(examples)),
                   element_count=int(result.get("element_count") or len(table.frame)), examples=examples)
    return finding


def _describe(finding: dict) -> str:
    where = f"{finding['expectation']}({finding['column']})" if finding.get("column") else finding["expectation"]
    total = finding.get("element_count")
    if total is None:  # a table-level check: the message says what was found
        return f"{finding['suite']}: {where}: {finding['message']}"
    count = finding.get("unexpected_count", 0)
    line = f"{finding['suite']}: {where}: {count:,} of {total:,} rows unexpected - {finding['message']}"
    examples = finding.get("examples") or []
    if examples:
        shown = "; ".join(_example_text(e) for e in examples[:SUMMARY_EXAMPLES])
        more = f" (+{count - SUMMARY_EXAMPLES:,} more)" if count > SUMMARY_EXAMPLES else ""
        line += f"; e.g. {shown}{more}"
    return line


def _example_text(example: dict) -> str:
    if "observed" in example and "reference" in example:
        shift = example["observed"] - example["reference"]
        what = " ".join(str(example[k]) for k in ("check", "name") if k in example)
        return f"{what}: {example['reference']:.1%} -> {example['observed']:.1%} ({shift * 100:+.1f} points)"
    parts = []
    if "file" in example:
        parts.append(str(example["file"]))
    elif "Image" in example:
        parts.append(f"Image {example['Image']!r}")
    if "row" in example:
        parts.append(f"row {example['row']}")
    text = " ".join(parts)
    if "Label" in example:
        text += f" Label {example['Label']!r}"
    if "value" in example:
        text += f" = {example['value']!r}"
    if "error" in example:
        text += f" ({example['error']})"
    return text


# ----------------------------------------------------------------------------------------------
# Entry points


def validate_dataset(
    path: str | os.PathLike[str],
    config: ValidationConfig = ValidationConfig(),
    reference_profile: dict | None = None,
) -> ValidationReport:
    """Validate a dataset folder or zip. Bad data gives success=False, never an exception;
    DataError only when the path is not a dataset at all."""
    return _validate(path, config, reference_profile, docs_dir=None)


def _validate(
    path: str | os.PathLike[str], config: ValidationConfig, reference_profile: dict | None, docs_dir: Path | None
) -> ValidationReport:
    started = time.perf_counter()
    timings: dict[str, float] = {}
    source = DatasetSource.open(path)
    reference = _check_profile(reference_profile, "reference_profile") if reference_profile else REFERENCE_PROFILE
    tick = time.perf_counter()
    data_fingerprint = fingerprint(source)
    timings["fingerprint"] = time.perf_counter() - tick
    tables: list[_Table] = []
    failures: list[dict] = []
    warnings: list[dict] = []
    statistics: dict[str, Any] = {}

    tick = time.perf_counter()
    train_csv: _Csv | None = None
    has_train_csv = source.exists(TRAIN_CSV)
    tables.append(_Table("files", "files.required", pd.DataFrame({"file": [TRAIN_CSV], "present": [has_train_csv]}), [
        _Check("expect_column_values_to_be_in_set", {"column": "present", "value_set": [True]},
               "every dataset needs train.csv"),
    ], ("file",)))
    if has_train_csv:
        train_csv, problem = _read_csv(source, TRAIN_CSV)
        if problem:
            failures.append(_csv_failure("labels", TRAIN_CSV, problem))
    if train_csv is not None:
        tables += _labels_tables(train_csv, config)
    train_listed = _listed_ids(train_csv)
    train_present = source.list_dir(TRAIN_DIR)
    tables.append(_train_files_table(train_listed, train_present))

    test_present = source.list_dir(TEST_DIR)
    test_listed: list[tuple[int, str]] = []
    if source.exists(SAMPLE_SUBMISSION_CSV):
        sample, problem = _read_csv(source, SAMPLE_SUBMISSION_CSV)
        if sample is None:
            failures.append(_csv_failure("files", SAMPLE_SUBMISSION_CSV, problem or "unreadable"))
        else:
            tables += _sample_tables(sample, test_present)
            test_listed = _listed_ids(sample)
    elif test_present:
        tables.append(_test_files_table([], test_present))
    timings["tables"] = time.perf_counter() - tick

    tick = time.perf_counter()
    train_names, test_names = set(train_present), set(test_present)
    jobs = [("train", row, i, f"{TRAIN_DIR}/{i}.png") for row, i in train_listed if f"{i}.png" in train_names]
    jobs += [("test", row, i, f"{TEST_DIR}/{i}.png") for row, i in test_listed if f"{i}.png" in test_names]
    records, workers = _inspect_images(_ImageReader(source, config.check_pixels), jobs)
    tables.append(_images_table(records, config))
    timings["images"] = time.perf_counter() - tick

    label_sets = _valid_label_sets(_column(train_csv, "Label"))
    profile = profile_labels(label_sets)
    if label_sets:
        tables.append(_distribution_table(profile, reference, config))

    tick = time.perf_counter()
    gx_failures, gx_warnings = _run_gx(tables, docs_dir)
    failures += gx_failures
    warnings += gx_warnings
    timings["great_expectations"] = time.perf_counter() - tick

    statistics.update({
        "train_rows": len(train_csv.rows) if train_csv is not None else 0,
        "label_sets_profiled": len(label_sets),
        "train_files": len(train_present),
        "test_rows": len(test_listed),
        "test_files": len(test_present),
        "images_checked": len(records),
        "image_bytes_read": int(sum(r["bytes"] or 0 for r in records)) if config.check_pixels else None,
        "pixel_check": "full decode" if config.check_pixels else "header and IEND trailer only",
        "image_workers": workers,
        "reference_profile": {"source": reference.get("source", "given"), "n": reference.get("n")},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    })
    report = ValidationReport(
        success=not failures, data_fingerprint=data_fingerprint, dataset=source.description,
        failures=failures, warnings=warnings, profile=profile, statistics=statistics,
        seconds=round(time.perf_counter() - started, 3),
    )
    for line in report.summary_lines():
        log.info("validation failure: %s", line)
    return report


def _valid_label_sets(labels: Iterable[Any]) -> list[frozenset[int]]:
    out = []
    for label in labels:
        try:
            out.append(parse_label_set(label))
        except ValueError:
            continue  # already a failed expectation; the profile counts only usable rows
    return out


def run_validation(
    path: str | os.PathLike[str],
    config: ValidationConfig = ValidationConfig(),
    store_uri: str | None = None,
    report_dir: Path | None = None,
) -> ValidationReport:
    """Validate, write report.json and Data Docs into report_dir (default: a new temp dir), and
    with a store: compare against its reference profile, upload both under
    validation/<fingerprint>/, and make a passing dataset the new reference."""
    from protein.links import object_uri
    from protein.storage import open_store

    DatasetSource.open(path)  # not a dataset at all: DataError before anything is written
    store = open_store(store_uri) if store_uri else None
    reference = _load_reference(store) if store is not None else None
    out = Path(report_dir) if report_dir is not None else Path(tempfile.mkdtemp(prefix="protein-validation-"))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".docs-", dir=out))
    try:
        report = _validate(path, config, reference, docs_dir=staging)
        docs = out / "docs"
        _replace_dir(staging, docs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.docs_path = str(docs / "index.html")
    if store is not None:
        prefix = f"{STORE_PREFIX}/{report.data_fingerprint}"
        _upload_dir(store, docs, f"{prefix}/docs")
        # Durable URIs, never presigned URLs: this report ends up in Prefect's database.
        report.docs_uri = object_uri(store, f"{prefix}/docs/index.html")
        report.report_uri = object_uri(store, f"{prefix}/report.json")
    text = json.dumps(report.to_dict(), indent=2, default=str)
    write_text_atomic(out / "report.json", text)
    if store is not None:
        store.put_bytes(f"{prefix}/report.json", text.encode(), content_type="application/json")
        if report.success and report.profile["n"] >= config.min_rows_for_drift:
            # Only a dataset big enough to be trusted becomes the reference; a 6-image dev set must
            # not make the next real dataset look like drift.
            accepted = {**report.profile, "source": f"accepted dataset {report.data_fingerprint}",
                        "data_fingerprint": report.data_fingerprint, "dataset": report.dataset,
                        "accepted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
            store.put_bytes(REFERENCE_PROFILE_KEY, json.dumps(accepted, indent=2).encode(),
                            content_type="application/json")
    log.info("validation %s for %s (%s): report %s", "passed" if report.success else "FAILED",
             report.dataset, report.data_fingerprint, report.report_uri or out / "report.json")
    return report


def _load_reference(store: Any) -> dict | None:
    if not store.exists(REFERENCE_PROFILE_KEY):
        return None
    try:
        return _check_profile(json.loads(store.get_bytes(REFERENCE_PROFILE_KEY)), REFERENCE_PROFILE_KEY)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError too
        log.warning("ignoring the stored reference profile, using the built-in one: %s", exc)
        return None


def _replace_dir(new: Path, target: Path) -> None:
    """Swap a finished folder into place: readers see the old docs or the new, never a mix."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _upload_dir(store: Any, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if not all(_STORE_KEY_PART.fullmatch(part) for part in rel.split("/")):
            log.warning("not uploading %s: its name is not a valid store key", rel)
            continue
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        store.put_bytes(f"{prefix}/{rel}", path.read_bytes(), content_type=content_type)
