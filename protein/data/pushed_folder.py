"""A content-addressed dataset in a local-folder store: ``<store>/datasets/<fingerprint>/manifest.json``
naming objects under ``<store>/datasets/objects/`` (protein.data.manifest).

A full-copy (format 1) dataset in a local store is a plain folder and is read as one
(`FolderSource`); only a format-2 manifest makes a folder this source. Every read checks the object's
SHA-256 against the manifest, as an S3 download does, so a corrupt or missing object is one line naming
the dataset, the file and the object, never wrong pixels.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from protein.data.digests import FileDigest, data_cache_dir
from protein.data.manifest import (
    DATASET_MANIFEST,
    DATASETS_PREFIX,
    FINGERPRINT,
    MANIFEST,
    DatasetManifest,
    parse_manifest,
)
from protein.data.sources import DatasetSource
from protein.errors import DataError, IntegrityError, StoreError
from protein.storage.records import parse_record


def read_local_manifest(folder: Path) -> DatasetManifest | None:
    """The manifest in `folder`, checked; None when the folder has none (a plain dataset folder)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    where = str(path)
    if path.stat().st_size > DATASET_MANIFEST.cap():
        raise DataError(f"{where}: {path.stat().st_size:,} bytes, larger than any dataset manifest")
    expected = folder.name if FINGERPRINT.fullmatch(folder.name) else None
    return parse_manifest(parse_record(path.read_bytes(), DATASET_MANIFEST, where), where, expected)


class PushedFolderSource(DatasetSource):
    """A format-2 dataset in a local store, read through its manifest."""

    def __init__(self, folder: Path, manifest: DatasetManifest, cache_dir: Path | None = None) -> None:
        if folder.parent.name != DATASETS_PREFIX:
            raise DataError(f"{folder}: a content-addressed dataset must sit at <store>/{DATASETS_PREFIX}/"
                            "<fingerprint>/ (its objects are found from there)")
        self.folder = folder
        self.store_root = folder.parent.parent
        self.manifest = manifest
        self.description = str(folder)
        self.cache_root = data_cache_dir(cache_dir)
        self._keys = manifest.object_keys()

    def _entry(self, relpath: str) -> tuple[str, Path]:
        key = self._keys.get(relpath)
        if key is None:
            raise DataError(f"{self.locate(relpath)}: file not found in the dataset")
        return key, self.store_root / key

    def read_bytes(self, relpath: str) -> bytes:
        key, path = self._entry(relpath)
        entry = self.manifest.files[relpath]
        try:
            blob = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"{self.description} file {relpath}: content object {path} is missing from the "
                             "store (push the dataset again from its source)") from None
        if len(blob) != entry.size or hashlib.sha256(blob).hexdigest() != entry.sha256:
            raise IntegrityError(f"{self.description} file {relpath}: content object {path} does not match its "
                                 f"SHA-256 ({len(blob):,} bytes read, {entry.size:,} expected); an operator deletes "
                                 "it, then a push of the dataset from its source uploads it again (docs/datasets.md)")
        return blob

    def exists(self, relpath: str) -> bool:
        return relpath in self._keys

    def size(self, relpath: str) -> int:
        self._entry(relpath)
        return self.manifest.files[relpath].size

    def list_dir(self, dirname: str) -> list[str]:
        prefix = dirname.rstrip("/") + "/"
        return sorted(n[len(prefix):] for n in self._keys if n.startswith(prefix))

    def digests(self) -> dict[str, FileDigest]:
        # The manifest's digests were checked against its fingerprint when it was read: no file is read.
        return self.manifest.digests()

    def sha256s(self, names: list[str]) -> dict[str, str]:
        for name in names:
            self._entry(name)
        return {name: self.manifest.files[name].sha256 for name in names}

    def file_signature(self, relpath: str) -> str:
        self._entry(relpath)
        entry = self.manifest.files[relpath]
        return f"{entry.size}:{entry.md5}"
