"""The data fingerprint: a pure function of the dataset's content.

SHA-256 over (logical name, size, MD5) of train.csv, the submission template and every file in
train/ and test/, sorted by name. Logical names make it independent of where the files sit (flat
folder, Kaggle's 'Human protein atlas/' layout, zip, S3 prefix, pushed dataset), and of anything
host-local (paths, mtimes): the same bytes give the same fingerprint after cp, rsync, unzip, push
or download; a changed, added, removed or renamed file gives another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from protein.data.digests import FileDigest
from protein.data.sources import DatasetSource

FINGERPRINT_VERSION = b"protein-data-fingerprint/2\n"
FINGERPRINT_CHARS = 16


def fingerprint_of(digests: Mapping[str, FileDigest]) -> str:
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    for name in sorted(digests):
        entry = digests[name]
        digest.update(f"{name}\0{entry.size}\0{entry.md5}\n".encode())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def fingerprint(source: DatasetSource) -> str:
    """Fingerprint of a dataset. A folder reads every file once (later calls hit the hash cache);
    a zip decompresses its members once; an S3 dataset needs only its listing or pushed manifest."""
    return fingerprint_of(source.digests())
