"""The competition tables: strict CSV parsing and the parsed dataset (train ids with label sets,
test ids in submission order)."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from protein.data.layout import (
    LABEL_COLUMNS,
    SAMPLE_SUBMISSION_CSV,
    TEMPLATE_HINT,
    TEST_DIR,
    TRAIN_CSV,
    TRAIN_DIR,
    check_image_id,
)
from protein.data.opening import open_dataset
from protein.data.sources import DatasetSource
from protein.errors import DataError
from protein.labels import encode_many, format_label_set, parse_label_set

# A labels table larger than this is not a plausible competition file; refuse before parsing.
MAX_CSV_BYTES = 64 * 1024 * 1024


def read_csv_table(source: DatasetSource, relpath: str, columns: tuple[str, ...] = LABEL_COLUMNS) -> pd.DataFrame:
    """Read a competition CSV as strings, tolerating a UTF-8 BOM and CRLF line endings."""
    return parse_csv_bytes(source.read_bytes(relpath), source.locate(relpath), columns)


def parse_csv_bytes(raw: bytes, where: str, columns: tuple[str, ...] = LABEL_COLUMNS) -> pd.DataFrame:
    if len(raw) > MAX_CSV_BYTES:
        raise DataError(f"{where}: {len(raw):,} bytes is larger than the {MAX_CSV_BYTES:,}-byte limit")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise DataError(f"{where}: empty file (expected a header row {','.join(columns)})")
    # The csv module, not pandas: pandas silently turns a row with one field too many into
    # an index and shifts every column; here such a row is an error naming its line.
    rows, lines = _csv_rows(text, where)
    header = [c.strip() for c in rows[0]]
    if (problem := blank_header_problem(where, header, columns)) is not None:
        raise DataError(problem)
    for line_number, row in zip(lines[1:], rows[1:], strict=True):
        if row and len(row) != len(header):
            raise DataError(
                f"{where} line {line_number}: {len(row)} fields, expected {len(header)} ({','.join(header)})"
            )
    frame = pd.DataFrame([r for r in rows[1:] if r], columns=header, dtype=str)
    # The line each data row starts on, as an editor numbers them: blank lines skipped above and
    # quoted fields spanning lines would shift a count of rows.
    frame.attrs["lines"] = [line for line, row in zip(lines[1:], rows[1:], strict=True) if row]
    frame.columns = [str(c).strip() for c in frame.columns]
    if tuple(frame.columns) != columns:
        missing = [c for c in columns if c not in frame.columns]
        what = f"missing column(s) {', '.join(missing)}" if missing else f"unexpected columns {list(frame.columns)}"
        raise DataError(f"{where}: {what} (expected exactly {','.join(columns)})")
    if frame.empty:
        raise DataError(f"{where}: no data rows (expected at least one image)")
    return frame


def blank_header_problem(where: str, first_row: list[str], columns: tuple[str, ...] = LABEL_COLUMNS) -> str | None:
    """Why line 1 cannot be the header, or None. One rule for the loader and the validation suite:
    the suite once skipped a blank line 1 and read line 2 as the header, so a train.csv passed
    validation and then failed to load in push and train."""
    if any(field.strip() for field in first_row):
        return None
    return f"{where} line 1: blank; expected the header {','.join(columns)}"


def _csv_rows(text: str, where: str) -> tuple[list[list[str]], list[int]]:
    """The rows and the line each starts on; DataError naming the line of a row the csv module
    cannot read (an unclosed quote runs on to the end of the file and overflows its field limit)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[list[str]] = []
    lines: list[int] = []
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return rows, lines
        except csv.Error as exc:
            raise DataError(f"{where} line {start}: not a CSV row ({exc}); look for an unclosed quote") from None
        rows.append(row)
        lines.append(start)


def csv_line(row_index: int, frame: pd.DataFrame | None = None) -> int:
    """Data row index -> the line number a user sees in an editor (header is line 1): the line the
    row starts on when `frame` came from parse_csv_bytes, else the index counted from line 2."""
    lines = frame.attrs.get("lines") if frame is not None else None
    return lines[row_index] if lines is not None and row_index < len(lines) else row_index + 2


def parse_labels_table(frame: pd.DataFrame, where: str) -> tuple[list[str], list[frozenset[int]]]:
    """Strictly parse train.csv rows; the first bad row raises DataError naming the line."""
    ids: list[str] = []
    label_sets: list[frozenset[int]] = []
    seen: dict[str, int] = {}
    for i, (image_id, label) in enumerate(zip(frame["Image"], frame["Label"], strict=True)):
        line = f"{where} line {csv_line(i, frame)}"
        image_id = image_id.strip()
        check_image_id(image_id, line)
        if image_id in seen:
            raise DataError(f"{line}: image id {image_id!r} repeats line {csv_line(seen[image_id], frame)}")
        seen[image_id] = i
        try:
            label_sets.append(parse_label_set(label))
        except ValueError as exc:
            raise DataError(f"{line} (Image {image_id!r}): {exc}") from None
        ids.append(image_id)
    return ids, label_sets


def test_ids_of(sample: pd.DataFrame, where: str) -> list[str]:
    """The submission template's ids in order; DataError naming the line of a bad or repeated one (a
    repeated id would be predicted, published and scored twice)."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for i, value in enumerate(sample["Image"]):
        line = f"{where} line {csv_line(i, sample)}"
        image_id = check_image_id(value.strip(), line)
        if image_id in seen:
            raise DataError(f"{line}: image id {image_id!r} repeats line {csv_line(seen[image_id], sample)}")
        seen[image_id] = i
        ids.append(image_id)
    return ids


@dataclass
class CompetitionData:
    """A parsed dataset: train ids with label sets, and test ids in submission order."""

    source: DatasetSource
    train_ids: list[str]
    train_label_sets: list[frozenset[int]]
    test_ids: list[str]
    _train_image_digests: dict[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def train_image_digests(self) -> dict[str, str]:
        """image id -> "size:md5" of its train image, for ids whose image the dataset holds. From the
        digests the fingerprint already keeps (a folder's hash cache, a zip's cache, S3 ETags, a
        pushed manifest), so no image is read again; kept for the life of this object."""
        if self._train_image_digests is None:
            digests = self.source.digests()
            self._train_image_digests = {
                image_id: f"{entry.size}:{entry.md5}" for image_id in self.train_ids
                if (entry := digests.get(self.train_path(image_id))) is not None}
        return self._train_image_digests

    @property
    def targets(self) -> np.ndarray:
        """(N, NUM_CLASSES) float32 multi-hot."""
        return encode_many(self.train_label_sets)

    def train_path(self, image_id: str) -> str:
        return f"{TRAIN_DIR}/{image_id}.png"

    def test_path(self, image_id: str) -> str:
        return f"{TEST_DIR}/{image_id}.png"

    def labels_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {"Image": self.train_ids, "Label": [format_label_set(s) for s in self.train_label_sets]}
        )


def load_competition(
    path: str | os.PathLike[str], require_test: bool = True, cache_dir: Path | None = None
) -> CompetitionData:
    """Open and strictly parse a dataset (folder, zip, s3:// prefix or zip); images are checked when read."""
    source = open_dataset(path, cache_dir=cache_dir)
    if not source.exists(TRAIN_CSV):
        raise DataError(f"{source.locate(TRAIN_CSV)}: file not found (every dataset needs {TRAIN_CSV})")
    frame = read_csv_table(source, TRAIN_CSV)
    train_ids, label_sets = parse_labels_table(frame, source.locate(TRAIN_CSV))
    test_ids: list[str] = []
    if source.exists(SAMPLE_SUBMISSION_CSV):
        sample = read_csv_table(source, SAMPLE_SUBMISSION_CSV)
        where = source.locate(SAMPLE_SUBMISSION_CSV)
        test_ids = test_ids_of(sample, where)
    elif require_test:
        raise DataError(f"{source.description}: no submission template (it gives the test ids and their order; "
                        f"{TEMPLATE_HINT})")
    return CompetitionData(source=source, train_ids=train_ids, train_label_sets=label_sets, test_ids=test_ids)
