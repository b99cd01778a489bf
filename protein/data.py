"""The competition dataset: a folder or the competition zip, read-only.

Layout (possibly nested one folder down, as in the Kaggle zip):
    train.csv                columns Image, Label (Label: space-separated class ids, a set)
    train/<Image>.png        512x512 RGB 8-bit
    test/<Image>.png
    sample_submission.csv    columns Image, Label; its order is the submission order
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import stat
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from protein.errors import DataError
from protein.labels import encode_many, format_label_set, parse_label_set

log = logging.getLogger(__name__)

TRAIN_CSV = "train.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
TRAIN_DIR = "train"
TEST_DIR = "test"
LABEL_COLUMNS = ("Image", "Label")
# Real ids are integers; we accept the characters a file name can carry safely on every
# filesystem and object store, and nothing that could walk a path.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
# Decompression-bomb guard: the competition images are 512x512; refuse anything absurdly big
# before PIL allocates it.
MAX_IMAGE_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A labels table larger than this is not a plausible competition file; refuse before parsing.
MAX_CSV_BYTES = 64 * 1024 * 1024


def check_image_id(image_id: str, where: str) -> str:
    if not isinstance(image_id, str) or not SAFE_ID.match(image_id):
        raise DataError(
            f"{where}: image id {image_id!r} is not a safe id "
            "(expected letters, digits, '_' or '-', at most 128 characters)"
        )
    return image_id


class DatasetSource:
    """Read-only access to the files of one dataset, whether a folder or a zip."""

    description: str

    def read_bytes(self, relpath: str) -> bytes:
        raise NotImplementedError

    def exists(self, relpath: str) -> bool:
        raise NotImplementedError

    def list_dir(self, dirname: str) -> list[str]:
        """File names (not paths) directly inside dirname, sorted; [] if it does not exist."""
        raise NotImplementedError

    def file_signature(self, relpath: str) -> str:
        """Cheap identity of one file's content, used by the fingerprint."""
        raise NotImplementedError

    def locate(self, relpath: str) -> str:
        return f"{self.description}/{relpath}"

    @staticmethod
    def open(path: str | os.PathLike[str]) -> DatasetSource:
        p = Path(path)
        if not p.exists():
            raise DataError(f"{p}: dataset not found (expected a folder or the competition .zip)")
        if p.is_dir():
            return FolderSource(p)
        if zipfile.is_zipfile(p):
            return ZipSource(p)
        raise DataError(f"{p}: not a folder or a zip file")


class FolderSource(DatasetSource):
    def __init__(self, path: Path) -> None:
        root = path.resolve()
        if not (root / TRAIN_CSV).exists():
            nested = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / TRAIN_CSV).exists()]
            if len(nested) == 1:
                root = nested[0]
        self.root = root
        self.description = str(root)

    def _path(self, relpath: str) -> Path:
        path = self.root / relpath
        # A symlink may point anywhere; refuse to read outside the dataset folder.
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise DataError(f"{self.locate(relpath)}: points outside the dataset folder ({resolved})")
        return path

    def read_bytes(self, relpath: str) -> bytes:
        path = self._path(relpath)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.locate(relpath)}: file not found") from None
        except IsADirectoryError:
            raise DataError(f"{self.locate(relpath)}: expected a file, found a folder") from None

    def exists(self, relpath: str) -> bool:
        return (self.root / relpath).is_file()

    def list_dir(self, dirname: str) -> list[str]:
        folder = self.root / dirname
        if not folder.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(folder) if not entry.is_dir())

    def file_signature(self, relpath: str) -> str:
        st = (self.root / relpath).lstat()
        kind = "l" if stat.S_ISLNK(st.st_mode) else "f"
        return f"{kind}:{st.st_size}:{st.st_mtime_ns}"


class ZipSource(DatasetSource):
    """Reads members in place; nothing is extracted, so zip-slip names cannot write anywhere,
    but they are refused anyway as a sign of a hostile archive."""

    def __init__(self, path: Path) -> None:
        self.path = path.resolve()
        self.description = str(self.path)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        with zipfile.ZipFile(self.path) as zf:
            infos = zf.infolist()
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name).parts
            if name.startswith("/") or "\\" in name or ".." in parts or re.match(r"^[A-Za-z]:", name):
                raise DataError(f"{self.path}: unsafe member name {name!r} (absolute path or '..')")
        names = {i.filename for i in infos if not i.is_dir()}
        candidates = sorted(
            n[: -len(TRAIN_CSV)] for n in names if n == TRAIN_CSV or n.endswith("/" + TRAIN_CSV)
        )
        # Prefer the top level, else exactly one folder down (the Kaggle zip nests once).
        candidates = [c for c in candidates if c.count("/") <= 1]
        if not candidates:
            raise DataError(f"{self.path}: no {TRAIN_CSV} at the top level or one folder down")
        self.prefix = candidates[0]
        self._infos = {
            i.filename[len(self.prefix) :]: i
            for i in infos
            if i.filename.startswith(self.prefix) and not i.is_dir()
        }

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None  # each worker process opens its own handle
        return state

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def read_bytes(self, relpath: str) -> bytes:
        info = self._infos.get(relpath)
        if info is None:
            raise DataError(f"{self.locate(relpath)}: file not found in the zip")
        try:
            return self._zipfile().read(info)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.locate(relpath)}: cannot read zip member ({exc})") from None

    def exists(self, relpath: str) -> bool:
        return relpath in self._infos

    def list_dir(self, dirname: str) -> list[str]:
        prefix = dirname.rstrip("/") + "/"
        return sorted(
            name[len(prefix) :] for name in self._infos if name.startswith(prefix) and "/" not in name[len(prefix) :]
        )

    def file_signature(self, relpath: str) -> str:
        info = self._infos[relpath]
        return f"z:{info.file_size}:{info.CRC:08x}"

    def locate(self, relpath: str) -> str:
        return f"{self.description}!{self.prefix}{relpath}"


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
    rows = list(csv.reader(io.StringIO(text, newline="")))
    header = [c.strip() for c in rows[0]]
    for line_number, row in enumerate(rows[1:], start=2):
        if row and len(row) != len(header):
            raise DataError(
                f"{where} line {line_number}: {len(row)} fields, expected {len(header)} ({','.join(header)})"
            )
    frame = pd.DataFrame([r for r in rows[1:] if r], columns=header, dtype=str)
    frame.columns = [str(c).strip() for c in frame.columns]
    if tuple(frame.columns) != columns:
        missing = [c for c in columns if c not in frame.columns]
        what = f"missing column(s) {', '.join(missing)}" if missing else f"unexpected columns {list(frame.columns)}"
        raise DataError(f"{where}: {what} (expected exactly {','.join(columns)})")
    if frame.empty:
        raise DataError(f"{where}: no data rows (expected at least one image)")
    return frame


def csv_line(row_index: int) -> int:
    """Data row index -> the line number a user sees in an editor (header is line 1)."""
    return row_index + 2


def parse_labels_table(frame: pd.DataFrame, where: str) -> tuple[list[str], list[frozenset[int]]]:
    """Strictly parse train.csv rows; the first bad row raises DataError naming the line."""
    ids: list[str] = []
    label_sets: list[frozenset[int]] = []
    seen: dict[str, int] = {}
    for i, (image_id, label) in enumerate(zip(frame["Image"], frame["Label"], strict=True)):
        line = f"{where} line {csv_line(i)}"
        image_id = image_id.strip()
        check_image_id(image_id, line)
        if image_id in seen:
            raise DataError(f"{line}: image id {image_id!r} repeats line {csv_line(seen[image_id])}")
        seen[image_id] = i
        try:
            label_sets.append(parse_label_set(label))
        except ValueError as exc:
            raise DataError(f"{line} (Image {image_id!r}): {exc}") from None
        ids.append(image_id)
    return ids, label_sets


@dataclass
class CompetitionData:
    """A parsed dataset: train ids with label sets, and test ids in submission order."""

    source: DatasetSource
    train_ids: list[str]
    train_label_sets: list[frozenset[int]]
    test_ids: list[str]

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


def load_competition(path: str | os.PathLike[str], require_test: bool = True) -> CompetitionData:
    """Open and strictly parse a dataset folder or zip; images are checked when read."""
    source = DatasetSource.open(path)
    if not source.exists(TRAIN_CSV):
        raise DataError(f"{source.locate(TRAIN_CSV)}: file not found (every dataset needs {TRAIN_CSV})")
    frame = read_csv_table(source, TRAIN_CSV)
    train_ids, label_sets = parse_labels_table(frame, source.locate(TRAIN_CSV))
    test_ids: list[str] = []
    if source.exists(SAMPLE_SUBMISSION_CSV):
        sample = read_csv_table(source, SAMPLE_SUBMISSION_CSV)
        where = source.locate(SAMPLE_SUBMISSION_CSV)
        test_ids = [check_image_id(v.strip(), f"{where} line {csv_line(i)}") for i, v in enumerate(sample["Image"])]
    elif require_test:
        raise DataError(
            f"{source.locate(SAMPLE_SUBMISSION_CSV)}: file not found (it gives the test ids and their order)"
        )
    return CompetitionData(source=source, train_ids=train_ids, train_label_sets=label_sets, test_ids=test_ids)


def png_end(data: bytes) -> int | None:
    """Offset just past the IEND chunk, found by walking the chunk lengths; None if there is none."""
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            return pos if pos <= len(data) else None
    return None


def decode_png(data: bytes, where: str) -> Image.Image:
    """Open and fully decode one competition image, refusing anything that is not an RGB PNG."""
    if not data:
        raise DataError(f"{where}: empty file (expected an RGB PNG)")
    bomb = f"exceeds the {MAX_IMAGE_PIXELS:,}-pixel limit (decompression-bomb guard)"
    try:
        # Our own size check below is stricter than PIL's warning; PIL's hard limit (twice its
        # warning level) raises before we get to look, and must not escape as a traceback.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DataError(f"{where}: not an image (expected an RGB PNG)") from None
    except Image.DecompressionBombError:
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        size = f"{width}x{height} pixels" if data.startswith(PNG_SIGNATURE) else "the image size"
        raise DataError(f"{where}: {size} {bomb}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # a PNG signature followed by garbage
        raise DataError(f"{where}: not an image, unreadable header ({exc}) (expected an RGB PNG)") from None
    if image.format != "PNG":
        raise DataError(f"{where}: {image.format} image (expected an RGB PNG)")
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(f"{where}: {width}x{height} pixels {bomb}")
    if image.mode != "RGB":
        raise DataError(f"{where}: mode {image.mode} (expected an 8-bit RGB PNG)")
    # Pillow opens 16-bit RGB as mode "RGB", silently dropping the low byte; IHDR byte 24 is the
    # bit depth, and validation refuses anything but 8, so the decoder must too.
    if data[24] != 8:
        raise DataError(f"{where}: {data[24]}-bit channels (expected an 8-bit RGB PNG)")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{where}: truncated or corrupt PNG ({exc})") from None
    # PIL stops reading at IEND: bytes after it (a smuggled payload, a second file glued on)
    # would pass unnoticed.
    end = png_end(data)
    if end is None:
        raise DataError(f"{where}: no IEND chunk (truncated PNG)")
    if end != len(data):
        raise DataError(f"{where}: {len(data) - end:,} bytes of trailing data after the IEND chunk")
    return image


def load_image(data: bytes, where: str, image_size: int) -> np.ndarray:
    """PNG bytes -> (image_size, image_size, 3) uint8, the one resize used by training,
    the cache and prediction alike."""
    image = decode_png(data, where)
    if image.size != (image_size, image_size):
        # reducing_gap gives a faster, antialiased downscale that stays stable across runs.
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def fingerprint(source: DatasetSource) -> str:
    """Identity of a dataset: SHA-256 over the bytes of both CSVs plus, for every file in
    train/ and test/, its name and a cheap content signature (size and mtime in a folder,
    size and CRC-32 in a zip). Renaming, adding, removing or rewriting any image changes it;
    reading pixels is not needed, so it costs milliseconds even for the real set."""
    digest = hashlib.sha256()
    for name in (TRAIN_CSV, SAMPLE_SUBMISSION_CSV):
        digest.update(name.encode())
        if source.exists(name):
            digest.update(hashlib.sha256(source.read_bytes(name)).digest())
    for folder in (TRAIN_DIR, TEST_DIR):
        for name in source.list_dir(folder):
            rel = f"{folder}/{name}"
            digest.update(f"{rel}\0{source.file_signature(rel)}\n".encode())
    return digest.hexdigest()[:16]

