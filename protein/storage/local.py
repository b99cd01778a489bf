"""`LocalStore`: a folder on a local (POSIX) filesystem.

Each object's SHA-256 lives in a sidecar ``<root>/.protein+meta/sha256/<key>``. The ``+`` cannot occur
in a key, so no key collides with the metadata folder and `list` never shows it. The same folder holds
the lock file (``fcntl.flock``: compare-and-swap is read-compare-write under an exclusive lock) and the
temp files of writes in progress. The local etag is the SHA-256 hex of the content.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from protein.atomic import fsync_dir, make_dirs_durably
from protein.errors import NotFound, PreconditionFailed, StoreError
from protein.storage.base import (
    ObjectInfo,
    check_if_match,
    copy_hashing,
    is_valid_key,
    logger,
    new_temp,
    read_capped,
    sha256_file,
    temp_beside,
    too_large,
    validate_key,
    validate_prefix,
    verify,
)

# Holds sidecars, the lock file and temp files; '+' is outside the key alphabet, so never a key.
LOCAL_META_DIR = ".protein+meta"


class LocalStore:
    """A folder on a local (POSIX) filesystem; see the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(Path(root).expanduser()))
        self.uri = str(self.root)
        self._meta = self.root / LOCAL_META_DIR
        self._sidecars = self._meta / "sha256"
        self._tmp = self._meta / "tmp"

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    def _uri(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    @contextmanager
    def _os_errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            where = self._uri(key) if key else self.uri
            raise StoreError(f"{where}: {exc.strerror or type(exc).__name__}") from exc

    @contextmanager
    def _locked(self, *, exclusive: bool) -> Iterator[None]:
        # Readers take the lock shared so they never pair new bytes with an old sidecar (or vice versa).
        lock_path = self._meta / "lock"
        if exclusive:
            self._meta.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        else:
            try:
                fd = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                # Never written by this module: no sidecars to keep consistent, and reads create nothing.
                yield
                return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read_sidecar(self, key: str) -> str | None:
        try:
            return (self._sidecars / key).read_text(encoding="ascii").strip() or None
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _current_etag(self, key: str) -> str | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return self._read_sidecar(key) or sha256_file(path)

    def _write_temp(self, data: bytes | bytearray | memoryview | IO[bytes]) -> tuple[Path, str]:
        tmp, fd = new_temp(self._tmp, "put-")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(data, bytes | bytearray | memoryview):
                    f.write(data)
                    digest = hashlib.sha256(data).hexdigest()
                else:
                    digest = copy_hashing(data, f)
                f.flush()
                # fsync before the rename, or a crash could leave a complete-looking empty object.
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp, digest

    def _commit(self, key: str, tmp: Path, digest: str) -> None:
        # Caller holds the exclusive lock. Sidecar first: a crash in between leaves a mismatch that
        # reads report, never an unverified new object. Each rename's folder is fsynced before the
        # next step, so a power loss keeps that order too, and a write that returned stays written.
        target = self._path(key)
        if target.is_dir():
            raise StoreError(f"{self._uri(key)}: a folder of other objects has this name")
        make_dirs_durably(target.parent)
        sidecar = self._sidecars / key
        make_dirs_durably(sidecar.parent)
        side_tmp, _ = self._write_temp(f"{digest}\n".encode("ascii"))
        os.replace(side_tmp, sidecar)
        fsync_dir(sidecar.parent)
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def _prune_empty_dirs(self, start: Path, stop: Path) -> None:
        # Leftover empty folders would block a later object with the folder's name.
        while start != stop and stop in start.parents:
            try:
                start.rmdir()
            except OSError:
                return
            start = start.parent

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        if_match: str | None = None,
        if_none_match: bool = False,
        content_type: str | None = None,
    ) -> str:
        validate_key(key)
        if if_match is not None and if_none_match:
            raise ValueError("pass if_match or if_none_match, not both")
        check_if_match(if_match)
        # content_type has no local equivalent; accepted so callers need not care which backend they use.
        with self._os_errors(key):
            tmp, digest = self._write_temp(data)
            try:
                with self._locked(exclusive=True):
                    if if_none_match or if_match is not None:
                        current = self._current_etag(key)
                        if if_none_match and current is not None:
                            raise PreconditionFailed(f"{self._uri(key)}: already exists")
                        if if_match is not None and current != if_match:
                            state = "does not exist" if current is None else "changed since its etag was read"
                            raise PreconditionFailed(f"{self._uri(key)}: {state}")
                    self._commit(key, tmp, digest)
            finally:
                tmp.unlink(missing_ok=True)
        logger.debug("wrote %s (%d bytes)", self._uri(key), len(data))
        return digest

    def get_bytes(self, key: str, *, max_bytes: int | None = None) -> bytes:
        path = self._path(key)
        with self._os_errors(key):
            with self._locked(exclusive=False):
                try:
                    # Once open, the bytes stay the ones the sidecar describes even if a writer replaces
                    # the file, so the lock is not held while reading.
                    f = open(path, "rb")  # noqa: SIM115
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    raise NotFound(f"{self._uri(key)}: not found") from None
                expected = self._read_sidecar(key)
            with f:
                if max_bytes is None:
                    data = f.read()
                else:
                    if (size := os.fstat(f.fileno()).st_size) > max_bytes:
                        raise too_large(self._uri(key), size, max_bytes)
                    data = read_capped(f, self._uri(key), max_bytes)
        verify(self._uri(key), expected, hashlib.sha256(data).hexdigest())
        return data

    def put_file(self, key: str, path: Path, *, if_none_match: bool = False) -> str:
        validate_key(key)
        # Opened outside _os_errors: a missing source is the caller's error, not the store's.
        with open(path, "rb") as src, self._os_errors(key):
            tmp, digest = self._write_temp(src)
            try:
                with self._locked(exclusive=True):
                    if if_none_match and self._path(key).is_file():
                        raise PreconditionFailed(f"{self._uri(key)}: already exists")
                    self._commit(key, tmp, digest)
            finally:
                tmp.unlink(missing_ok=True)
        logger.debug("uploaded %s to %s", path, self._uri(key))
        return digest

    def get_file(self, key: str, path: Path) -> str:
        source = self._path(key)
        path = Path(path)
        with self._os_errors(key), self._locked(exclusive=False):
            try:
                src = open(source, "rb")  # noqa: SIM115
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                raise NotFound(f"{self._uri(key)}: not found") from None
            expected = self._read_sidecar(key)
        with src:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp, dst = temp_beside(path)
            try:
                with dst:
                    with self._os_errors(key):
                        actual = copy_hashing(src, dst)
                    dst.flush()
                    os.fsync(dst.fileno())
                verify(self._uri(key), expected, actual)
                os.replace(tmp, path)
                fsync_dir(path.parent)  # callers commit on it (a model.json written beside these weights)
            finally:
                tmp.unlink(missing_ok=True)
        return actual

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        # Walk only the folder the prefix names (up to its last '/'), not the whole store.
        start = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not self._root_is_folder():
            return []
        keys: list[str] = []
        with self._os_errors():
            for dirpath, dirnames, filenames in os.walk(start, onerror=self._unlistable):
                rel = Path(dirpath).relative_to(self.root).as_posix()
                base = "" if rel == "." else f"{rel}/"
                dirnames[:] = sorted(
                    d
                    for d in dirnames
                    if d != LOCAL_META_DIR and (f"{base}{d}/".startswith(prefix) or prefix.startswith(f"{base}{d}/"))
                )
                keys.extend(
                    f"{base}{name}"
                    for name in filenames
                    if f"{base}{name}".startswith(prefix) and is_valid_key(f"{base}{name}")
                )
        return sorted(keys)

    def _root_is_folder(self) -> bool:
        """False for a store never written; StoreError for a root that is something else (a file
        given as --store once listed as an empty store, and gc reported what it had deleted)."""
        if self.root.is_dir():
            return True
        if os.path.lexists(self.root):
            raise StoreError(f"{self.uri}: not a folder (a local store is a folder)")
        return False

    def _unlistable(self, exc: OSError) -> None:
        # os.walk skips a folder it cannot read unless told otherwise: an unreadable datasets/<fp>/
        # (another user's umask on a shared store) listed as empty, and gc deleted the objects of
        # the complete dataset whose manifest it hid. Only a folder that is not there is empty.
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            return  # never written, removed since the walk began, or an object where a folder would be
        raise StoreError(f"{exc.filename}: cannot list this store folder ({exc.strerror or type(exc).__name__})")

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        found = []
        with self._os_errors():
            for key in self.list(prefix):
                try:
                    st = self._path(key).stat()
                except FileNotFoundError:
                    continue  # deleted since the listing
                found.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return found

    def _delete_locked(self, key: str) -> None:
        target = self._path(key)
        if target.is_dir():
            return  # a folder of other objects, not an object: nothing to delete under this key
        with suppress(FileNotFoundError, NotADirectoryError):
            target.unlink()
        sidecar = self._sidecars / key
        with suppress(FileNotFoundError, NotADirectoryError):
            sidecar.unlink()
        self._prune_empty_dirs(target.parent, self.root)
        self._prune_empty_dirs(sidecar.parent, self._sidecars)

    def delete(self, key: str) -> None:
        validate_key(key)
        if not self._root_is_folder():
            return  # nothing was ever written; do not create the store just to delete from it
        with self._os_errors(key), self._locked(exclusive=True):
            self._delete_locked(key)

    def delete_prefix(self, prefix: str) -> int:
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix (refusing to empty the whole store)")
        keys = self.list(prefix)
        if keys:
            with self._os_errors(prefix), self._locked(exclusive=True):
                for key in keys:
                    self._delete_locked(key)
        return len(keys)

    def delete_keys(self, keys: list[str]) -> int:
        for key in keys:
            validate_key(key)
        if keys and self._root_is_folder():
            with self._os_errors(), self._locked(exclusive=True):
                for key in keys:
                    self._delete_locked(key)
        return len(keys)

    def recorded_sha256(self, key: str) -> tuple[int, str | None] | None:
        path = self._path(key)
        with self._os_errors(key), self._locked(exclusive=False):
            try:
                size = path.stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                return None
            return size, self._read_sidecar(key)

    def clock(self) -> float:
        return time.time()  # the files' mtimes are this host's clock

    def etag(self, key: str) -> str | None:
        validate_key(key)
        with self._os_errors(key), self._locked(exclusive=False):
            return self._current_etag(key)

    def url(self, key: str, expires_s: int = 3600) -> str:
        # Local paths do not expire; expires_s is accepted so callers need not care about the backend.
        return self._path(key).as_uri()

    def clean_stale_uploads(self, older_than_s: float = 3600, dry_run: bool = False) -> int:
        # Only old files: a younger one may belong to a write in progress in another process.
        if not self._tmp.is_dir():
            return 0
        cutoff = time.time() - older_than_s
        stale = [p for p in self._tmp.iterdir() if p.is_file() and p.stat().st_mtime < cutoff]
        if not dry_run:
            for path in stale:
                path.unlink(missing_ok=True)
        return len(stale)

    def check(self) -> None:
        existing = self.root
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StoreError(f"{self.uri}: {existing} is not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StoreError(f"{self.uri}: folder {existing} is not writable")
