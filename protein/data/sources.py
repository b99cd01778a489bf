"""Read-only access to the files of one dataset: a local folder, a zip, or (protein.data.s3) an
S3 prefix or zip. Every source answers in logical names (see protein.data.layout)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from protein.cache_budget import EntryHold, touch
from protein.data.digests import FileDigest, HashCache, cache_file_for, data_cache_dir, md5_bytes
from protein.data.layout import SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_CSV, TRAIN_DIR, Layout, resolve_layout
from protein.errors import DataError

log = logging.getLogger(__name__)

# No zip member is inflated past this: the largest file a dataset may hold (train.csv's cap,
# protein.data.tables.MAX_CSV_BYTES; validation caps images lower). Checked against the central
# directory before a member is opened, and again on the bytes actually inflated, so a lying directory
# or a zip bomb costs at most this much memory, never the inflated size.
MAX_ZIP_MEMBER_BYTES = 64 * 1024 * 1024
ZIP_READ_CHUNK = 1 << 20


class DatasetSource:
    """Read-only access to the files of one dataset, by logical name (train.csv, sample_submission.csv
    for the submission template wherever it sits, train/<name>, test/<name>)."""

    description: str
    cache_root: Path

    def read_bytes(self, relpath: str) -> bytes:
        raise NotImplementedError

    def exists(self, relpath: str) -> bool:
        raise NotImplementedError

    def list_dir(self, dirname: str) -> list[str]:
        """File names (not paths) directly inside dirname, sorted; [] if it does not exist."""
        raise NotImplementedError

    def size(self, relpath: str) -> int:
        return len(self.read_bytes(relpath))

    def locate(self, relpath: str) -> str:
        return f"{self.description}/{relpath}"

    def fingerprint_files(self) -> list[str]:
        """The logical names the fingerprint covers: both CSVs and every file in train/ and test/."""
        names = [n for n in (TRAIN_CSV, SAMPLE_SUBMISSION_CSV) if self.exists(n)]
        return names + [f"{d}/{n}" for d in (TRAIN_DIR, TEST_DIR) for n in self.list_dir(d)]

    def digests(self) -> dict[str, FileDigest]:
        """Size and MD5 of every fingerprinted file (reads content; sources override to go faster)."""
        out = {}
        for name in self.fingerprint_files():
            data = self.read_bytes(name)
            out[name] = FileDigest(len(data), md5_bytes(data))
        return out

    def file_signature(self, relpath: str) -> str:
        """Content identity of one file: size and MD5."""
        data = self.read_bytes(relpath)
        return f"{len(data)}:{md5_bytes(data)}"

    def sha256s(self, names: list[str]) -> dict[str, str]:
        """SHA-256 hex of each named file (a push's content-object names); sources that know them
        without reading every byte override this."""
        return {name: hashlib.sha256(self.read_bytes(name)).hexdigest() for name in names}



class FolderSource(DatasetSource):
    """A local folder. `root` is the folder holding train.csv (the Kaggle download nests it in
    'Human protein atlas/'); `base` is the folder given, which may hold the template above root."""

    def __init__(self, path: Path, cache_dir: Path | None = None) -> None:
        base = Path(path).resolve()

        def subdirs(folder: str) -> list[str]:
            try:
                with os.scandir(base / folder) as entries:
                    return sorted(e.name for e in entries if e.is_dir())
            except OSError:
                return []

        self.base = base
        self.layout: Layout = resolve_layout(lambda rel: (base / rel).is_file(), subdirs, str(base), strict=False)
        self.root = base / self.layout.root if self.layout.root else base
        self.description = str(self.root)
        self.cache_root = data_cache_dir(cache_dir)

    def _path(self, relpath: str) -> Path:
        path = self.base / self.layout.physical(relpath)
        # A symlink may point anywhere; refuse to read outside the dataset folder.
        resolved = path.resolve()
        if resolved != self.base and self.base not in resolved.parents:
            raise DataError(f"{self.locate(relpath)}: points outside the dataset folder ({resolved})")
        return path

    def locate(self, relpath: str) -> str:
        return str(self.base / self.layout.physical(relpath))

    def read_bytes(self, relpath: str) -> bytes:
        path = self._path(relpath)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{self.locate(relpath)}: file not found") from None
        except IsADirectoryError:
            raise DataError(f"{self.locate(relpath)}: expected a file, found a folder") from None

    def exists(self, relpath: str) -> bool:
        return (self.base / self.layout.physical(relpath)).is_file()

    def size(self, relpath: str) -> int:
        return self._path(relpath).stat().st_size

    def list_dir(self, dirname: str) -> list[str]:
        folder = self.root / dirname
        if not folder.is_dir():
            return []
        with os.scandir(folder) as entries:
            return sorted(entry.name for entry in entries if not entry.is_dir())

    def digests(self) -> dict[str, FileDigest]:
        files = {name: self._path(name) for name in (TRAIN_CSV, SAMPLE_SUBMISSION_CSV) if self.exists(name)}
        stats: dict[str, os.stat_result] = {}
        # An image that is a symlink out of the dataset is never read; it enters the fingerprint
        # by where it points, so validation can still report it beside every other bad file
        # (reading it for training or prediction is refused, as always).
        outside: dict[str, FileDigest] = {}
        for folder in (TRAIN_DIR, TEST_DIR):
            path = self._path(folder)
            if not path.is_dir():
                continue
            # One scandir per folder gives every file's stat; only symlinks pay for a resolve().
            # Closed explicitly: a refused symlink raises mid-iteration.
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir():
                        continue
                    name = f"{folder}/{entry.name}"
                    if not entry.is_symlink():
                        files[name] = Path(entry.path)
                        stats[name] = entry.stat(follow_symlinks=False)
                        continue
                    try:
                        files[name] = self._path(name)
                    except DataError:
                        target = os.readlink(entry.path).encode(errors="surrogateescape")
                        outside[name] = FileDigest(size=0, md5=md5_bytes(b"symlink outside the dataset:" + target))
        cache = HashCache(cache_file_for(self.cache_root, "folder", [self.base]))
        try:
            return {**cache.digests(files, stats), **outside}
        except FileNotFoundError as exc:
            raise DataError(f"{exc.filename}: vanished while fingerprinting the dataset") from None

    def file_signature(self, relpath: str) -> str:
        digest = HashCache(cache_file_for(self.cache_root, "folder", [self.base])).digests(
            {relpath: self._path(relpath)})[relpath]
        return f"{digest.size}:{digest.md5}"

    def sha256s(self, names: list[str]) -> dict[str, str]:
        # Same identity rule as the MD5 cache: a re-push of a folder that grew reads only the new files.
        cache = HashCache(cache_file_for(self.cache_root, "folder-sha256", [self.base]), algorithm="sha256")
        try:
            return {name: pair[1] for name, pair in cache.hexdigests({n: self._path(n) for n in names}).items()}
        except FileNotFoundError as exc:
            raise DataError(f"{exc.filename}: vanished while hashing the dataset") from None


class ZipSource(DatasetSource):
    """Reads members in place; nothing is extracted, so zip-slip names cannot write anywhere,
    but they are refused anyway as a sign of a hostile archive."""

    def __init__(self, path: Path, cache_dir: Path | None = None, description: str | None = None,
                 max_member_bytes: int = MAX_ZIP_MEMBER_BYTES, hold: EntryHold | None = None) -> None:
        """`hold`: for a zip of the download cache (protein.data.s3), held for this source's life so the
        cache's size bound never removes the zip under its decode workers."""
        self.path = Path(path).resolve()
        self._hold = hold
        self.max_member_bytes = max_member_bytes
        self.description = description or str(self.path)
        self.cache_root = data_cache_dir(cache_dir)
        self._zip: zipfile.ZipFile | None = None
        self._pid = -1
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{self.description}: not a readable zip ({exc})") from None
        for info in infos:
            name = info.filename
            parts = PurePosixPath(name).parts
            if name.startswith("/") or "\\" in name or ".." in parts or re.match(r"^[A-Za-z]:", name):
                raise DataError(f"{self.description}: unsafe member name {name!r} (absolute path or '..')")
        files = {i.filename: i for i in infos if not i.is_dir()}
        children: dict[str, set[str]] = {}  # folder ('' = top, else 'a/b/') -> names of folders inside it
        for name in files:
            parts = name.split("/")[:-1]
            for depth, part in enumerate(parts):
                children.setdefault("".join(f"{p}/" for p in parts[:depth]), set()).add(part)

        def subdirs(folder: str) -> list[str]:
            return sorted(children.get(folder, ()))

        self.layout = resolve_layout(lambda rel: rel in files, subdirs, self.description, strict=True)
        self.prefix = self.layout.root
        self._infos = {
            name[len(self.prefix) :]: info for name, info in files.items() if name.startswith(self.prefix)
        }
        if self.layout.template is not None:
            self._infos[SAMPLE_SUBMISSION_CSV] = files[self.layout.template]
        identity = _file_identity(self.path)
        # A cached zip's mtime (and so ctime) records its last use, not its content, which its name already
        # identifies (it is only ever written by a rename): in the hash cache's key, a use would cost a
        # re-hash of every member.
        self._identity = list(identity) if hold is None else [identity[0], identity[3]]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None  # each worker process opens its own handle
        state["_hold"] = None  # the lock stays with the process that opened the source, for its whole run
        return state

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._pid = os.getpid()
        return self._zip

    def _member(self, relpath: str) -> zipfile.ZipInfo:
        info = self._infos.get(relpath)
        if info is None:
            raise DataError(f"{self.locate(relpath)}: file not found in the zip")
        if info.file_size > self.max_member_bytes:
            raise DataError(f"{self.locate(relpath)}: declares {info.file_size:,} bytes inflated, more than the "
                            f"{self.max_member_bytes:,}-byte cap for a zip member; not inflated")
        return info

    def _chunks(self, relpath: str) -> Iterator[bytes]:
        """The member's inflated bytes in chunks, refused once they pass the cap whatever the directory said."""
        info = self._member(relpath)
        total = 0
        try:
            with self._zipfile().open(info) as member:
                while chunk := member.read(ZIP_READ_CHUNK):
                    total += len(chunk)
                    if total > self.max_member_bytes:
                        raise DataError(f"{self.locate(relpath)}: inflates past the {self.max_member_bytes:,}-byte "
                                        f"cap for a zip member (its directory says {info.file_size:,}); refused")
                    yield chunk
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{self.locate(relpath)}: cannot read zip member ({exc})") from None

    def read_bytes(self, relpath: str) -> bytes:
        return b"".join(self._chunks(relpath))

    def _digest(self, relpath: str) -> FileDigest:
        digest = hashlib.md5(usedforsecurity=False)
        size = 0
        for chunk in self._chunks(relpath):
            digest.update(chunk)
            size += len(chunk)
        return FileDigest(size, digest.hexdigest())

    def exists(self, relpath: str) -> bool:
        return relpath in self._infos

    def size(self, relpath: str) -> int:
        info = self._infos.get(relpath)
        if info is None:
            raise DataError(f"{self.locate(relpath)}: file not found in the zip")
        return info.file_size

    def list_dir(self, dirname: str) -> list[str]:
        prefix = dirname.rstrip("/") + "/"
        return sorted(
            name[len(prefix) :] for name in self._infos if name.startswith(prefix) and "/" not in name[len(prefix) :]
        )

    def digests(self) -> dict[str, FileDigest]:
        # Members are decompressed and hashed once per zip file (same bytes as after unzip, so the same
        # fingerprint); the result is kept keyed by the zip's own identity.
        cache_path = cache_file_for(self.cache_root, "zip", [self.path, *self._identity])
        names = self.fingerprint_files()
        try:
            cached = json.loads(cache_path.read_text())
            if all(name in cached for name in names):
                touch(cache_path)  # a hit is a use: else the size bound evicts it first and the zip is re-hashed
                return {name: FileDigest(*cached[name]) for name in names}
        except (OSError, ValueError, TypeError):
            pass
        # Streamed member by member under the cap: never a whole member in memory to hash it.
        out = {name: self._digest(name) for name in names}
        from protein.atomic import write_bytes_atomic

        try:
            write_bytes_atomic(cache_path, json.dumps({k: [v.size, v.md5] for k, v in out.items()}).encode(),
                               durable=False)
        except OSError as exc:
            log.warning("could not write the hash cache %s: %s", cache_path, exc)
        return out

    def locate(self, relpath: str) -> str:
        info = self._infos.get(relpath)
        return f"{self.description}!{info.filename if info else self.prefix + relpath}"


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
