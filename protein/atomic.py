"""Atomic local writes: readers see the old file or the new one, never half of it; durable ones also
survive a power loss."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _create_beside(path: Path) -> Path:
    """A new empty file beside `path` with the mode a plain open() gives (0o666 less the umask).
    mkstemp's 0600 survived os.replace, so `--out submission.csv` replacing a 0644 file left it
    readable by its owner only; the process umask is not read here, as setting it to read it is
    process-wide and races other threads."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp


def fsync_dir(folder: Path) -> None:
    """Flush `folder`'s entries to disk. A rename lives in the folder, not in the file: until the folder
    is fsynced, a power loss can undo an os.replace whose file data was already fsynced (a promoted
    champion.json reverting to the previous champion)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # Some network and FUSE filesystems cannot fsync a folder: the rename is then as durable as
        # that filesystem makes it, which is no reason to fail a write that succeeded.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def make_dirs_durably(folder: Path) -> None:
    """`mkdir -p` that also fsyncs the folder above each one it creates: a new folder's own entry is
    lost to a power loss just as a renamed file's is, and takes every object under it along."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for created in reversed(missing):
        created.mkdir(exist_ok=True)
        fsync_dir(created.parent)


@contextmanager
def naming(path: Path) -> Iterator[None]:
    """An OSError raised inside that names no file gets `path` as its file name (errno and type kept).
    write(), flush() and fsync() on a full disk raise one naming nothing, so the CLI's one line
    would say "No space left on device" without saying where."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


@contextmanager
def atomic_path(path: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it vanishes.
    ``durable=False`` is for caches, which a power loss may roll back: their next use rebuilds them,
    so they skip the folder fsyncs."""
    path = Path(path)
    if durable:
        make_dirs_durably(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(path)
    try:
        with naming(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            if durable:
                fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    write_bytes_atomic(path, text.encode(), durable=durable)
