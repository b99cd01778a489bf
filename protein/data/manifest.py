"""Dataset manifests and content-object keys: what a pushed dataset is, and where its bytes live.

Two formats are read, one is written:

- ``protein-dataset/1`` (written before content addressing): a full copy of every file under
  ``datasets/<fingerprint>/<name>``, with the manifest beside them.
- ``protein-dataset/2``: ``datasets/<fingerprint>/manifest.json`` only; each file's bytes are one
  content object, ``datasets/objects/<sha256[:2]>/<sha256>``, shared by every dataset that holds them
  (as DVC's cache and lakeFS's object store do). A push uploads only the objects the store lacks.

Both map each logical name (train.csv, sample_submission.csv, train/<name>, test/<name>) to its size,
MD5 (the fingerprint's digest) and SHA-256 (the object's identity and the integrity check on every
read). Everything here is pure: parsing, validation and key building, no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from protein.data.digests import FileDigest
from protein.data.fingerprint import fingerprint_of
from protein.data.layout import SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_CSV, TRAIN_DIR
from protein.errors import DataError
from protein.storage import is_valid_key
from protein.storage.records import RecordSchema

DATASETS_PREFIX = "datasets"
OBJECTS_PREFIX = f"{DATASETS_PREFIX}/objects"
MANIFEST = "manifest.json"
FORMAT_FULL_COPY = "protein-dataset/1"
FORMAT_CONTENT = "protein-dataset/2"
FORMATS = (FORMAT_FULL_COPY, FORMAT_CONTENT)
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
# What every reader of a manifest checks first (protein.storage.records): the shape; `parse_manifest`
# then checks every entry.
DATASET_MANIFEST = RecordSchema(
    "dataset manifest", required={"format": str, "fingerprint": str, "files": dict},
    optional={"created": str, "train_images": int, "test_images": int, "train_rows": int, "test_rows": int,
              "bytes": int}, max_bytes=MAX_MANIFEST_BYTES)

FINGERPRINT = re.compile(r"[0-9a-f]{16}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MD5_HEX = re.compile(r"[0-9a-f]{32}")
MANIFEST_KEY = re.compile(rf"^{DATASETS_PREFIX}/([0-9a-f]{{16}})/{re.escape(MANIFEST)}$")
OBJECT_KEY = re.compile(rf"^{OBJECTS_PREFIX}/([0-9a-f]{{2}})/([0-9a-f]{{64}})$")


def object_key(sha256: str) -> str:
    """The store key of the content object with this SHA-256 (lowercase hex, checked: keys are built
    only from validated digests). Two hex characters of fan-out keep local folders small."""
    if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
        raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
    return f"{OBJECTS_PREFIX}/{sha256[:2]}/{sha256}"


def digest_of_object_key(key: str) -> str | None:
    """The SHA-256 an object key names, or None for any key that is not a well-formed content object
    (gc leaves those alone)."""
    match = OBJECT_KEY.match(key)
    if match is None or not match.group(2).startswith(match.group(1)):
        return None
    return match.group(2)


def manifest_key(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"not a dataset fingerprint (16 hex digits): {fingerprint!r}")
    return f"{DATASETS_PREFIX}/{fingerprint}/{MANIFEST}"


def is_dataset_file_name(name: str) -> bool:
    """A logical name a dataset may hold: the two CSVs, or one file directly in train/ or test/."""
    if name in (TRAIN_CSV, SAMPLE_SUBMISSION_CSV):
        return True
    folder, _, base = name.partition("/")
    return folder in (TRAIN_DIR, TEST_DIR) and "/" not in base and is_valid_key(name)


@dataclass(frozen=True)
class ManifestEntry:
    size: int
    md5: str
    sha256: str

    @property
    def digest(self) -> FileDigest:
        return FileDigest(self.size, self.md5)

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "md5": self.md5, "sha256": self.sha256}


@dataclass(frozen=True)
class DatasetManifest:
    format: str
    fingerprint: str
    files: dict[str, ManifestEntry]
    doc: dict[str, Any]  # the whole record, for the counts `datasets list` shows

    @property
    def content_addressed(self) -> bool:
        return self.format == FORMAT_CONTENT

    def digests(self) -> dict[str, FileDigest]:
        return {name: entry.digest for name, entry in self.files.items()}

    def object_keys(self) -> dict[str, str]:
        """Logical name -> content object key (format 2 only)."""
        return {name: object_key(entry.sha256) for name, entry in self.files.items()}


def _entry(name: str, raw: object, where: str) -> ManifestEntry:
    if not is_dataset_file_name(name):
        raise DataError(f"{where}: file name {name!r} is not one a dataset holds (train.csv, sample_submission.csv, "
                        "train/<name> or test/<name>, in key characters)")
    if not isinstance(raw, dict):
        raise DataError(f"{where}: entry for {name} is not an object")
    size, md5, sha256 = raw.get("size"), raw.get("md5"), raw.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise DataError(f"{where}: entry for {name}: size {size!r} is not a non-negative integer")
    if not isinstance(md5, str) or not MD5_HEX.fullmatch(md5):
        raise DataError(f"{where}: entry for {name}: md5 {md5!r} is not 32 lowercase hex digits")
    if not isinstance(sha256, str) or not SHA256_HEX.fullmatch(sha256):
        raise DataError(f"{where}: entry for {name}: sha256 {sha256!r} is not 64 lowercase hex digits")
    return ManifestEntry(size, md5, sha256)


def parse_manifest(doc: dict[str, Any], where: str, expected_fingerprint: str | None = None) -> DatasetManifest:
    """Check a manifest record (already through `DATASET_MANIFEST`'s shape check) entry by entry: a
    known format, well-formed names and digests, and a fingerprint that its files really have (and
    that matches the folder it sits in, when given). Raises `DataError` naming the manifest."""
    fmt = doc.get("format")
    if fmt not in FORMATS:
        raise DataError(f"{where}: format {fmt!r}, expected one of {', '.join(FORMATS)}")
    files_doc = doc.get("files")
    if not isinstance(files_doc, dict) or TRAIN_CSV not in files_doc:
        raise DataError(f"{where}: lists no {TRAIN_CSV}; not a dataset manifest")
    files = {name: _entry(name, raw, where) for name, raw in files_doc.items()}
    claimed = doc.get("fingerprint")
    actual = fingerprint_of({name: entry.digest for name, entry in files.items()})
    if claimed != actual or (expected_fingerprint is not None and expected_fingerprint != actual):
        under = f" under datasets/{expected_fingerprint}/" if expected_fingerprint else ""
        raise DataError(f"{where}: its files have fingerprint {actual}, but it claims {claimed!r}{under}")
    return DatasetManifest(str(fmt), actual, files, doc)


def manifest_doc(fingerprint: str, files: dict[str, ManifestEntry], created: str, train_rows: int,
                 test_rows: int) -> dict[str, Any]:
    """The format-2 record a push writes."""
    names = sorted(files)
    return {
        "format": FORMAT_CONTENT,
        "fingerprint": fingerprint,
        "created": created,
        "train_images": sum(1 for n in names if n.startswith(f"{TRAIN_DIR}/")),
        "test_images": sum(1 for n in names if n.startswith(f"{TEST_DIR}/")),
        "train_rows": train_rows,
        "test_rows": test_rows,
        "bytes": sum(files[n].size for n in names),
        "files": {name: files[name].to_dict() for name in names},
    }
