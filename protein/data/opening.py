"""One way in: a dataset URI or path to the source that reads it.

It sits above `sources` (folders and zips) and `s3` (prefixes and zips in a bucket), so neither
needs to import the other.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from protein.data.pushed_folder import PushedFolderSource, read_local_manifest
from protein.data.s3 import open_s3_source
from protein.data.sources import DatasetSource, FolderSource, ZipSource
from protein.errors import DataError
from protein.storage.s3 import misspelled_s3_uri
from protein.storage.s3_clients import redacted_uri


def open_dataset(path: str | os.PathLike[str], cache_dir: Path | None = None) -> DatasetSource:
    """A folder, a zip, s3://bucket/prefix/ or s3://bucket/key.zip (a pushed dataset's URI included).
    cache_dir is the cache root (default `protein.locations.default_cache_dir`): S3 downloads and hash
    caches go to its datasets/."""
    text = os.fspath(path)
    misspelled = misspelled_s3_uri(text) if isinstance(text, str) else None
    if misspelled is not None:
        raise DataError(f"{misspelled}: not a dataset URI (expected s3://bucket/prefix/, or a local "
                        "folder or zip whose name does not start with 's3:' or 's3//')")
    if isinstance(text, str) and text.startswith("s3://"):
        return open_s3_source(text, cache_dir)
    if isinstance(text, str) and "://" in text:
        raise DataError(f"{redacted_uri(text)}: unsupported dataset URI (use a local folder, a .zip, or "
                        "s3://bucket/prefix/)")
    p = Path(text)
    if not p.exists():
        raise DataError(f"{p}: dataset not found (expected a folder or the competition .zip)")
    if p.is_dir():
        # A content-addressed push in a local store holds only its manifest; a full copy (the format
        # pushes wrote before) is a plain folder beside its manifest and is read as one.
        manifest = read_local_manifest(p)
        if manifest is not None and manifest.content_addressed:
            return PushedFolderSource(p.resolve(), manifest, cache_dir=cache_dir)
        return FolderSource(p, cache_dir=cache_dir)
    try:
        # Opened here: is_zipfile swallows every OSError, so an unreadable zip was "not a zip file".
        with open(p, "rb") as handle:
            is_zip = zipfile.is_zipfile(handle)
    except OSError as exc:  # not transient (no retry): the file is what it is until someone changes it
        raise DataError(f"{p}: {exc.strerror or exc}") from None
    if is_zip:
        return ZipSource(p, cache_dir=cache_dir)
    raise DataError(f"{p}: not a folder or a zip file")
