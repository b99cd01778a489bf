"""Datasets in S3: ``s3://bucket/prefix/`` (the competition layout under a prefix, Kaggle's nested
'Human protein atlas/' included, or a dataset pushed by `protein datasets push`) and
``s3://bucket/key.zip``.

Nothing is read from S3 twice on a host: files are downloaded into <cache>/datasets/ keyed by the
object's identity (bucket, key, ETag, size) or, for a pushed dataset, by the SHA-256 its manifest
records. A file lands under its final name only after its size and checksum matched (temp file, then
atomic rename), so a local copy is either complete and verified or absent. Each GET carries
If-Match with the ETag the listing showed: an object replaced during the download is refused by the
server, reported in one line, and nothing of it is cached.

Images are fetched per folder (train/ or test/) on first use, in parallel, so `predict` downloads
only test/. A zip is downloaded whole (resuming a partial download with a ranged GET) and then read
in place; its ZipSource holds it (protein.cache_budget.EntryHold), so no process's size bound
removes it while the run's decode workers may still reopen it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protein.atomic import write_bytes_atomic
from protein.cache_budget import EntryHold, download_lock, enforce_cache_budget, max_cache_bytes, touch
from protein.data.digests import FileDigest, cache_file_for, data_cache_dir, hash_file, md5_file
from protein.data.layout import EXPECTED_LAYOUT, SAMPLE_SUBMISSION_CSV, TEST_DIR, TRAIN_CSV, TRAIN_DIR, resolve_layout
from protein.data.manifest import DATASET_MANIFEST, MANIFEST, MAX_MANIFEST_BYTES, parse_manifest
from protein.data.sources import DatasetSource, ZipSource
from protein.errors import DataError, IntegrityError, NotFound, PreconditionFailed, StoreError
from protein.storage import ListedObject, S3Store
from protein.storage.records import parse_record
from protein.storage.s3 import split_s3_uri
from protein.storage.s3_clients import redacted_uri

log = logging.getLogger(__name__)

# A prefix named like a pushed dataset must carry its manifest: without it the push did not finish.
PUSHED_PREFIX = re.compile(r"(?:^|/)datasets/([0-9a-f]{16})/$")
# Single-part uploads (every image; most CSVs) have the content's MD5 as ETag.
MD5_ETAG = re.compile(r'^"?([0-9a-f]{32})"?$')
DOWNLOAD_THREADS = 16


@dataclass(frozen=True)
class RemoteFile:
    """One file of an S3 dataset: where it is and what its bytes must be."""

    key: str
    size: int
    etag: str | None  # the version the listing showed; downloads require it (If-Match)
    md5: str | None  # from a single-part ETag or the manifest
    sha256: str | None = None  # from a pushed manifest
    # For a content object (format-2 dataset): "<dataset URI> file <name>", so a missing or corrupt
    # object is reported against the dataset and file a person knows, with the key beside them.
    owner: str | None = None


def parse_s3_uri(uri: str) -> tuple[str, str]:
    try:
        bucket, key = split_s3_uri(uri)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if any(ord(c) < 32 for c in key) or ".." in key.split("/"):
        raise DataError(f"{redacted_uri(uri)}: invalid S3 key (control characters or '..')")
    return bucket, key


def _s3_store(bucket: str, uri: str) -> S3Store:
    try:
        return S3Store(bucket)
    except ValueError as exc:
        raise DataError(f"{redacted_uri(uri)}: {exc}") from None


def open_s3_source(uri: str, cache_dir: Path | None = None) -> DatasetSource:
    cache_root = data_cache_dir(cache_dir)
    bucket, key = parse_s3_uri(uri)
    store = _s3_store(bucket, uri)
    if key and not key.endswith("/"):
        listed = store.list_objects(key)
        exact = [o for o in listed if o.key == key]
        if exact:
            if not key.lower().endswith(".zip"):
                raise DataError(f"{uri}: an object, not a dataset (expected a prefix ending in '/' or a .zip)")
            return _open_cached_zip(store, exact[0], cache_root / "zips", cache_dir, uri)
        key += "/"
    objects = store.list_objects(key)
    if not objects:
        raise DataError(f"{uri}: no objects under this prefix ({EXPECTED_LAYOUT}; or name a .zip)")
    return S3Source(f"s3://{bucket}/{key}", bucket, key, objects, cache_root)


def _open_cached_zip(store: S3Store, info: ListedObject, folder: Path, cache_dir: Path | None,
                     uri: str) -> ZipSource:
    # Twice at most: another process's bound may remove a copy unused for an hour between the hit (which
    # marks it used) and the hold; then it is downloaded again.
    for _ in range(2):
        local = fetch_object(store, info, folder, ".zip")
        hold = EntryHold(local)
        if local.is_file():
            return ZipSource(local, cache_dir=cache_dir, description=uri, hold=hold)
        hold.release()
    raise DataError(f"{uri}: the downloaded copy vanished from {folder} twice")


def _object_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Several processes (decode workers, two flows on one host) may want the same download: one does it.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _HashingWriter:
    def __init__(self, f: Any, md5: Any = None) -> None:
        self.f = f
        self.md5 = md5 or hashlib.md5(usedforsecurity=False)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> int:
        self.md5.update(chunk)
        self.sha256.update(chunk)
        self.size += len(chunk)
        return self.f.write(chunk)


def _changed(bucket: str, key: str, what: str) -> StoreError:
    return StoreError(f"{_object_uri(bucket, key)}: {what} during the download; nothing was cached "
                      "(retry once whoever writes the dataset has finished)")


def _download_verified(store: S3Store, remote: RemoteFile, target: Path) -> None:
    """GET one object into a temp file, check it, then rename it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            try:
                store.download_object(remote.key, writer, if_match=remote.etag)  # type: ignore[arg-type]
            except PreconditionFailed:
                raise _changed(store.bucket, remote.key, f"changed (no longer ETag {remote.etag})") from None
            except NotFound:
                if remote.owner is not None:
                    raise StoreError(f"{remote.owner}: content object {_object_uri(store.bucket, remote.key)} is "
                                     "missing from the store; nothing was cached (push the dataset again from "
                                     "its source)") from None
                raise _changed(store.bucket, remote.key, "was deleted") from None
            f.flush()
            os.fsync(f.fileno())
        where = _object_uri(store.bucket, remote.key)
        if remote.owner is not None and (writer.size != remote.size or writer.sha256.hexdigest() != remote.sha256):
            raise IntegrityError(f"{remote.owner}: content object {where} does not match its SHA-256 "
                                 f"({writer.size:,} bytes read, {remote.size:,} expected); nothing was cached (an "
                                 "operator deletes it, then a push of the dataset from its source uploads it again: "
                                 "docs/datasets.md)")
        if writer.size != remote.size:
            raise _changed(store.bucket, remote.key,
                           f"changed size ({remote.size:,} bytes listed, {writer.size:,} read)")
        # No MD5-vs-ETag check here: an encrypted object's (SSE-KMS, SSE-C) ETag looks like an MD5 but is
        # not one. If-Match already pinned the version; a pushed dataset's files are checked by SHA-256.
        if remote.sha256 is not None and writer.sha256.hexdigest() != remote.sha256:
            raise IntegrityError(f"{where}: content does not match the SHA-256 in the dataset's {MANIFEST}; "
                                 "nothing was cached")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch_object(store: S3Store, info: ListedObject, folder: Path, suffix: str = "") -> Path:
    """Download one (large) object once, resuming a partial download; returns the verified local copy."""
    identity = hashlib.sha256(f"s3\0{store.bucket}\0{info.key}\0{info.etag}\0{info.size}".encode()).hexdigest()[:32]
    final = folder / f"{identity}{suffix}"
    if final.is_file() and final.stat().st_size == info.size:
        touch(final)  # a hit is a use: else the size bound removes the zip a run reads every night
        return final
    max_cache_bytes()  # a bad bound fails now, not after the download it would have bounded
    part = folder / f"{identity}{suffix}.part"
    uri = _object_uri(store.bucket, info.key)
    # An encrypted object's ETag is no MD5: the bytes are then held to their version (If-Match) and size.
    match = MD5_ETAG.match(info.etag) if store.etag_is_md5(info.key) else None
    # In locks/, where the size bound never looks: a lock it deleted while held would let a second
    # process lock a new file of that name and write the same .part.
    with _file_lock(download_lock(final)):
        if final.is_file() and final.stat().st_size == info.size:
            touch(final)
            return final
        folder.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            have = part.stat().st_size if part.is_file() else 0
            if have > info.size:
                part.unlink()
                have = 0
            if have:
                log.info("%s: resuming the download at byte %d of %d", uri, have, info.size)
            if have < info.size:
                try:
                    with open(part, "ab") as f:
                        store.download_object(info.key, f, if_match=info.etag, start=have)
                        f.flush()
                        os.fsync(f.fileno())
                except PreconditionFailed:
                    part.unlink(missing_ok=True)
                    raise _changed(store.bucket, info.key, f"changed (no longer ETag {info.etag})") from None
                except NotFound:
                    part.unlink(missing_ok=True)
                    raise _changed(store.bucket, info.key, "was deleted") from None
            digest = md5_file(part)
            verified = digest.size == info.size and (match is None or digest.md5 == match.group(1))
            if not verified and attempt == 1 and digest.size == info.size and not have:
                # A whole fresh download under If-Match that still differs from the ETag: the ETag is not an
                # MD5 (an encrypted object). The version is pinned by If-Match and the size matches.
                log.info("%s: ETag %s is not the MD5 of the bytes (encrypted object?); accepted by version and size",
                         uri, info.etag)
                verified = True
            if verified:
                os.replace(part, final)
                enforce_cache_budget(folder.parent.parent, keep=[f"datasets/{folder.name}/{final.name}"])
                return final
            log.warning("%s: the partial download does not match the object; downloading it again", uri)
            part.unlink(missing_ok=True)
    raise IntegrityError(f"{uri}: downloaded twice and the bytes never matched the object (ETag {info.etag}, "
                         f"{info.size:,} bytes); nothing was cached")


class S3Source(DatasetSource):
    """A dataset under an S3 prefix, read through the local download cache."""

    def __init__(self, uri: str, bucket: str, prefix: str, objects: list[ListedObject], cache_root: Path) -> None:
        self.uri = uri
        self.description = uri.rstrip("/")
        self.bucket = bucket
        self.prefix = prefix
        self.cache_root = cache_root
        self._store: S3Store | None = None
        self._pid = -1
        self._digests: dict[str, FileDigest] | None = None
        listed = {o.key[len(prefix) :]: o for o in objects}
        if MANIFEST in listed:
            self.files, self.manifest = self._from_manifest(listed)
        elif PUSHED_PREFIX.search(prefix):
            raise DataError(f"{self.description}: incomplete dataset push (no {MANIFEST}); run "
                            "`protein datasets push` again to finish it")
        else:
            self.files, self.manifest = self._from_listing(listed), None

    # --- building the file table ---
    def _from_listing(self, listed: dict[str, ListedObject]) -> dict[str, RemoteFile]:
        children: dict[str, set[str]] = {}
        for name in listed:
            parts = name.split("/")[:-1]
            for depth, part in enumerate(parts):
                children.setdefault("".join(f"{p}/" for p in parts[:depth]), set()).add(part)
        layout = resolve_layout(lambda rel: rel in listed, lambda d: sorted(children.get(d, ())), self.description,
                                strict=True)
        physical: dict[str, str] = {TRAIN_CSV: layout.root + TRAIN_CSV}
        if layout.template is not None:
            physical[SAMPLE_SUBMISSION_CSV] = layout.template
        for folder in (TRAIN_DIR, TEST_DIR):
            inside = f"{layout.root}{folder}/"
            for name in listed:
                if name.startswith(inside) and "/" not in name[len(inside) :] and name != inside:
                    physical[f"{folder}/{name[len(inside):]}"] = name
        md5_etags = self._md5_etags([listed[name] for name in physical.values()])
        files: dict[str, RemoteFile] = {}
        for logical, name in physical.items():
            o = listed[name]
            files[logical] = RemoteFile(o.key, o.size, o.etag, md5_etags.get(o.key))
        return files

    def _md5_etags(self, objects: list[ListedObject]) -> dict[str, str]:
        """The MD5 each object's ETag gives, for the objects whose ETag is one.

        An encrypted object's (SSE-KMS, SSE-C) ETag looks like an MD5 but is not one: taken as such, the
        fingerprint is another than the same files' anywhere else, and a push finds the file "changed
        while being pushed". Encryption is per object (a bucket's default switched to KMS later, images
        synced with --sse aws:kms), and the listing does not show it, so each single-part object gets a
        HEAD; a multipart ETag ("-N") is no MD5 whatever the encryption. Trusting the ETags and
        re-hashing at push only where the bytes disagree would mend the push but not the fingerprint
        that validation and training take from the listing. What a HEAD said is kept per (key, ETag)
        (an object rewritten gets a new ETag), so a prefix costs its HEADs once per host."""
        single_part = {o.key: (o.etag, match.group(1)) for o in objects if (match := MD5_ETAG.match(o.etag))}
        cache_path = cache_file_for(self.cache_root, "s3-etags", ["s3", self.bucket, self.prefix])
        try:
            cached = json.loads(cache_path.read_text())
            touch(cache_path)  # a hit is a use: else the size bound evicts it first and every HEAD is redone
        except (OSError, ValueError):
            cached = {}
        known: dict[str, bool] = {}
        for key, (etag, _) in single_part.items():
            entry = cached.get(key) if isinstance(cached, dict) else None
            if isinstance(entry, list) and len(entry) == 2 and entry[0] == etag and isinstance(entry[1], bool):
                known[key] = entry[1]
        todo = [key for key in single_part if key not in known]
        if todo:
            store = self._s3()

            def etag_is_md5(key: str) -> bool:
                try:
                    return store.etag_is_md5(key, single_part[key][0])
                except NotFound:  # deleted since the listing: its download says so
                    return False

            with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
                known.update(zip(todo, pool.map(etag_is_md5, todo), strict=True))
            try:
                write_bytes_atomic(cache_path, json.dumps({key: [single_part[key][0], is_md5]
                                                           for key, is_md5 in known.items()}).encode(),
                                   durable=False)
            except OSError as exc:  # a read-only cache only costs the HEADs again
                log.warning("could not write the ETag cache %s: %s", cache_path, exc)
        return {key: md5 for key, (_, md5) in single_part.items() if known[key]}

    def _from_manifest(self, listed: dict[str, ListedObject]) -> tuple[dict[str, RemoteFile], dict[str, Any]]:
        info = listed[MANIFEST]
        where = f"{self.uri}{MANIFEST}"
        if info.size > MAX_MANIFEST_BYTES:
            raise DataError(f"{where}: {info.size:,} bytes, larger than any dataset manifest")
        folder = self.cache_root / "manifests"
        # Twice at most: the cache's size bound (protein.cache_budget) may remove a copy unused for an hour
        # between the hit (which marks it used) and this read; then it is downloaded again.
        for _ in range(2):
            try:
                raw = fetch_object(self._s3(), info, folder, ".json").read_bytes()
                break
            except FileNotFoundError:
                continue
        else:
            raise DataError(f"{where}: the downloaded copy vanished from {folder} twice")
        named = PUSHED_PREFIX.search(self.prefix)
        manifest = parse_manifest(parse_record(raw, DATASET_MANIFEST, where), where,
                                  named.group(1) if named else None)
        files: dict[str, RemoteFile] = {}
        if manifest.content_addressed:
            # The objects sit beside the datasets/ folder this one is in; nothing is listed for them (a
            # missing one is reported when it is read, naming this dataset, the file and the key).
            if named is None:
                raise DataError(f"{where}: a content-addressed manifest must sit at datasets/<fingerprint>/")
            root = self.prefix[: len(self.prefix) - len(f"datasets/{manifest.fingerprint}/")]
            for name, key in manifest.object_keys().items():
                entry = manifest.files[name]
                files[name] = RemoteFile(root + key, entry.size, None, entry.md5, entry.sha256,
                                         owner=f"{self.description} file {name}")
            return files, manifest.doc
        for name, entry in manifest.files.items():
            listed_object = listed.get(name)
            if listed_object is None or listed_object.size != entry.size:
                raise StoreError(f"{self.uri}{name}: listed in {MANIFEST} but missing from the store "
                                 "or of another size")
            files[name] = RemoteFile(listed_object.key, entry.size, listed_object.etag, entry.md5, entry.sha256)
        return files, manifest.doc

    # --- DatasetSource ---
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_store"] = None  # boto3 clients do not cross processes; each worker makes its own
        return state

    def _s3(self) -> S3Store:
        if self._store is None or self._pid != os.getpid():
            self._store = _s3_store(self.bucket, self.uri)
            self._pid = os.getpid()
        return self._store

    def locate(self, relpath: str) -> str:
        remote = self.files.get(relpath)
        if remote is None or remote.owner is not None:  # a content object's key means nothing to a person
            return f"{self.uri}{relpath}"
        return _object_uri(self.bucket, remote.key)

    def exists(self, relpath: str) -> bool:
        return relpath in self.files

    def size(self, relpath: str) -> int:
        return self._remote(relpath).size

    def list_dir(self, dirname: str) -> list[str]:
        prefix = dirname.rstrip("/") + "/"
        return sorted(n[len(prefix) :] for n in self.files if n.startswith(prefix))

    def _remote(self, relpath: str) -> RemoteFile:
        remote = self.files.get(relpath)
        if remote is None:
            raise DataError(f"{self.uri}{relpath}: file not found in the dataset")
        return remote

    def local_path(self, remote: RemoteFile) -> Path:
        if remote.sha256 is not None:  # content-addressed: shared by every dataset holding these bytes
            name = f"sha256-{remote.sha256}"
        else:
            identity = f"s3\0{self.bucket}\0{remote.key}\0{remote.etag}\0{remote.size}"
            name = f"s3-{hashlib.sha256(identity.encode()).hexdigest()[:40]}"
        return self.cache_root / "objects" / name[-2:] / name

    def read_bytes(self, relpath: str) -> bytes:
        remote = self._remote(relpath)
        path = self.local_path(remote)
        # Twice at most: the cache's size bound (protein.cache_budget) may remove a copy that was not
        # used for an hour between the check and the read; then it is fetched again.
        for _ in range(2):
            if not path.is_file():
                # The first image of a folder brings the whole folder, in parallel: one GET per image,
                # one at a time, would make decoding wait on the network.
                folder, _, _ = relpath.rpartition("/")
                self.fetch([f"{folder}/{n}" for n in self.list_dir(folder)] if folder else [relpath])
            try:
                blob = path.read_bytes()
            except FileNotFoundError:
                continue
            touch(path)
            return blob
        raise DataError(f"{self.locate(relpath)}: the downloaded copy vanished from {path} twice")

    def fetch(self, relpaths: list[str]) -> int:
        """Download every file of `relpaths` not yet cached (in parallel); returns how many. Every one of
        them is then cached and marked used, so the caller can read or hash them right away."""
        paths = [self.local_path(self._remote(r)) for r in relpaths]
        # Marked used before any bound runs, this one's or another process's: a copy cached on an earlier
        # day is otherwise the first to go, between this call and the caller's read (sha256s, digests).
        for path in paths:
            touch(path)
        todo = [r for r, path in zip(relpaths, paths, strict=True) if not path.is_file()]
        if not todo:
            return 0
        max_cache_bytes()  # a bad bound fails now, not after the downloads it would have bounded
        group = hashlib.sha256(f"{self.uri}\0{todo[0].rpartition('/')[0]}".encode()).hexdigest()[:24]
        with _file_lock(self.cache_root / "locks" / f"{group}.lock"):
            todo = [r for r in todo if not self.local_path(self._remote(r)).is_file()]
            if todo:
                log.info("%s: downloading %d files", self.uri, len(todo))
                store = self._s3()
                with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
                    futures = [pool.submit(_download_verified, store, self._remote(r), self.local_path(self._remote(r)))
                               for r in todo]
                    try:
                        for future in futures:
                            future.result()
                    except BaseException:
                        for future in futures:
                            future.cancel()
                        raise
        enforce_cache_budget(self.cache_root.parent,
                             keep=[f"datasets/{path.relative_to(self.cache_root)}" for path in paths])
        return len(todo)

    def sha256s(self, names: list[str]) -> dict[str, str]:
        # A pushed dataset's manifest already says; other objects are fetched (once) and hashed.
        self.fetch([n for n in names if self._remote(n).sha256 is None])
        return {n: self._remote(n).sha256 or hash_file(self.local_path(self._remote(n)), "sha256")[1] for n in names}

    def digests(self) -> dict[str, FileDigest]:
        # ETags (single-part) and manifests give each file's MD5 without a download; only objects
        # uploaded in several parts or encrypted with KMS need their bytes. Kept for the life of
        # this source (its files are fixed by its listing): the fingerprint and the split's image
        # digests would otherwise download and hash every such object once each.
        if self._digests is None:
            unknown = [name for name, remote in self.files.items() if remote.md5 is None]
            if unknown:
                self.fetch(unknown)
            self._digests = {name: FileDigest(remote.size, remote.md5) if remote.md5 is not None
                             else md5_file(self.local_path(remote)) for name, remote in self.files.items()}
        return dict(self._digests)
