"""Image inspection: one read per file, in worker processes when there are many.

Each listed image yields one record: what its PNG header (IHDR) and trailer (IEND) say and, when
pixels are checked, the verdict of `protein.data.decode_png` itself (the decoder training and
prediction use, so validation and training can never disagree), a SHA-256 of the decoded pixels
(leakage and duplicates), a 64-bit difference hash (near-duplicates), the per-band intensity
statistics and whether every pixel is the same (blank images). A file larger than
the cap is refused from its size in the folder or the zip directory, before it is read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import zipfile
import zlib
from typing import Any

import numpy as np

from protein.data import PNG_SIGNATURE, DatasetSource, FolderSource, ZipSource, decode_png
from protein.errors import DataError, ProteinError, StoreError
from protein.pools import ignore_interrupts, pool_context
from protein.storage.s3_clients import redacted_uri
from protein.validation.drift import CHANNELS, IMAGE_STATISTICS
from protein.validation.neardup import difference_hash

# Signature (8) + IHDR length and type (8) + IHDR body (13) + CRC (4).
PNG_HEADER_BYTES = 33
# Every complete PNG ends with this empty IEND chunk; a file cut short does not.
PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"
PNG_COLOR_TYPES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}
OTHER_FORMATS = ((b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"),
                 (b"MM\x00*", "TIFF"), (b"RIFF", "WEBP"))
IMAGE_COLUMNS = ("row", "split", "Image", "file", "bytes", "format", "mode", "bit_depth", "width", "height",
                 "size", "interlaced", "decodes", "constant", "content_sha256", "dhash", "error", *IMAGE_STATISTICS)
# Below this many images the per-image cost is so small that starting processes costs more
# (spawned workers import numpy and PIL afresh).
POOL_MIN_IMAGES_DECODE = 256
POOL_MIN_IMAGES_HEADERS = 8192
MAX_WORKERS = 8

Job = tuple[str, int, str, str]  # split, CSV line, image id, relative path

# What a file in the dataset itself can cause when opened: a looping symlink, a folder where an
# image goes. A listed file that is gone (ENOENT) was removed during the run (a missing image is
# judged from the listing, and the fingerprint hashed this one). Any other OSError (ENOSPC or
# EDQUOT in the download cache, EIO, EMFILE, ENOMEM, EACCES...) is this host's fault: a verdict
# resting on either would be stored and refuse good data for days.
DATA_ERRNOS = frozenset({errno.ENOTDIR, errno.EISDIR, errno.ELOOP})


def host_read_error(source: DatasetSource, relpath: str, exc: OSError) -> ProteinError:
    """The one-line refusal for an image this host could not read through no fault of the image."""
    if exc.errno == errno.ENOENT:
        return DataError(f"{redacted_uri(source.locate(relpath))}: vanished while validating the dataset; no "
                         "verdict was recorded (validate again once nothing is changing it)")
    code = errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno is not None else "no errno"
    where = f" ({exc.filename})" if exc.filename is not None else ""
    return StoreError(f"{redacted_uri(source.locate(relpath))}: cannot read it on this host{where}: "
                      f"{exc.strerror or exc} [{code}]; no verdict was recorded (fix the host: free space, "
                      "permissions, the disk; then validate again)")


def declared_size(source: DatasetSource, relpath: str) -> int | None:
    """A file's size without reading it: the folder's stat or the zip's central directory."""
    if isinstance(source, FolderSource):
        try:
            return (source.root / relpath).stat().st_size
        except OSError:
            return None
    if isinstance(source, ZipSource):
        info = source._infos.get(relpath)  # noqa: SLF001 - the zip's directory is what we need
        return info.file_size if info is not None else None
    return None


class ImageReader:
    """Reads what the checks need from one image: header and trailer, or every byte when pixels
    are checked (then the decode and the content hash reuse that read)."""

    def __init__(self, source: DatasetSource, check_pixels: bool, max_bytes: int) -> None:
        self.source = source
        self.check_pixels = check_pixels
        self.max_bytes = max_bytes

    def _read(self, relpath: str) -> tuple[int, bytes, bytes]:
        """(size, head, tail) where head is the whole file when pixels are checked."""
        source = self.source
        if isinstance(source, FolderSource):
            path = source.root / relpath
            # A symlink may point anywhere; refuse to read outside the dataset folder.
            if path.is_symlink():
                resolved = path.resolve()
                if source.root not in resolved.parents:
                    raise DataError(f"points outside the dataset folder ({resolved})")
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > self.max_bytes:
                    return size, b"", b""
                if self.check_pixels:
                    data = f.read(min(size, self.max_bytes) + 1)  # the file's size, never the bound's
                    return len(data), data, data[-len(PNG_TRAILER):]
                head = f.read(PNG_HEADER_BYTES)
                if size <= PNG_HEADER_BYTES:
                    return size, head, head[-len(PNG_TRAILER):]
                f.seek(max(size - len(PNG_TRAILER), 0))
                return size, head, f.read(len(PNG_TRAILER))
        size = declared_size(source, relpath)
        if size is not None and size > self.max_bytes:
            return size, b"", b""
        # Zip members (seeking inside a compressed member means decompressing up to it anyway)
        # and any other source: read it all; ZipSource keeps one handle per worker process.
        data = source.read_bytes(relpath)
        return len(data), data, data[-len(PNG_TRAILER):]

    def inspect(self, job: Job) -> dict:
        split, row, image_id, relpath = job
        record: dict[str, Any] = dict.fromkeys(IMAGE_COLUMNS)
        record.update(row=row, split=split, Image=image_id, file=relpath)
        try:
            size, head, tail = self._read(relpath)
        except OSError as exc:
            if exc.errno is not None and exc.errno not in DATA_ERRNOS:
                # Raised, not recorded: it crosses the process pool and no report is written.
                raise host_read_error(self.source, relpath, exc) from None
            record.update(format="unreadable", error=f"cannot read: {exc}")
            return record
        except (DataError, zipfile.BadZipFile, KeyError) as exc:
            record.update(format="unreadable", error=f"cannot read: {exc}")
            return record
        record["bytes"] = size
        if size == 0:
            record["error"] = "empty file"
            return record
        if size > self.max_bytes:
            record["error"] = f"{size:,} bytes: larger than the {self.max_bytes:,}-byte cap, not read"
            return record
        record.update(png_header(head))
        if record["format"] != "PNG":
            return record
        if tail != PNG_TRAILER:
            # Either the file stops early or something follows the image: tell which.
            trailing = len(head) == size and PNG_TRAILER in head  # whole file read: look inside
            error = ("data after the IEND chunk (trailing garbage)" if trailing
                     else "does not end with an IEND chunk: truncated")
            record.update(decodes=False, error=error)
            return record
        if not self.check_pixels:
            record["decodes"] = True
            return record
        problem = broken_chunk(head)
        if problem is not None:
            record.update(decodes=False, error=problem)
            return record
        try:
            image = decode_png(head, relpath)
        except DataError as exc:
            record.update(decodes=False, error=str(exc).removeprefix(f"{relpath}: "))
            return record
        except Exception as exc:  # noqa: BLE001 - any decoder error means training could not use the file
            record.update(decodes=False, error=f"cannot decode: {exc}")
            return record
        pixels = image.tobytes()
        record["decodes"] = True
        # Pixels, not file bytes: the same image saved twice with other compression is the same content.
        record["content_sha256"] = hashlib.sha256(f"{image.mode}{image.size}".encode() + pixels).hexdigest()
        record.update(band_statistics(image.histogram(), image.size[0] * image.size[1]))
        record["dhash"] = difference_hash(image)  # near-duplicates, from the same decoded image
        return record


_LEVELS = np.arange(256, dtype=np.float64)


def band_statistics(histogram: list[int], pixels: int) -> dict[str, Any]:
    """Per RGB band: mean, std and saturated fraction (share of pixels at 255), on a 0-1 scale,
    and whether the image is blank (each band one value). From the 768-bin histogram PIL counts
    in C: no per-pixel work in Python, so the decode pass barely slows down."""
    counts = np.asarray(histogram, dtype=np.float64).reshape(len(CHANNELS), 256)
    mean = counts @ _LEVELS / pixels
    var = np.maximum(counts @ (_LEVELS**2) / pixels - mean**2, 0.0)
    out: dict[str, Any] = {"constant": bool(((counts > 0).sum(axis=1) == 1).all())}
    for i, channel in enumerate(CHANNELS):
        out[f"{channel}_mean"] = round(float(mean[i]) / 255, 6)
        out[f"{channel}_std"] = round(float(np.sqrt(var[i])) / 255, 6)
        out[f"{channel}_saturated"] = round(float(counts[i, 255]) / pixels, 6)
    return out


def png_header(head: bytes) -> dict[str, Any]:
    """Format, mode, bit depth, size and interlacing from the signature and IHDR, without decoding."""
    if not head.startswith(PNG_SIGNATURE):
        name = next((fmt for magic, fmt in OTHER_FORMATS if head.startswith(magic)), "unknown")
        return {"format": name, "error": f"not a PNG (looks like {name})"}
    if len(head) < PNG_HEADER_BYTES or head[8:16] != b"\x00\x00\x00\x0dIHDR":
        return {"format": "corrupt PNG", "error": "no IHDR chunk after the PNG signature"}
    body, crc = head[16:29], struct.unpack(">I", head[29:33])[0]
    if zlib.crc32(head[12:29]) != crc:
        return {"format": "corrupt PNG", "error": "IHDR chunk fails its CRC"}
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", body)
    return {"format": "PNG", "mode": PNG_COLOR_TYPES.get(color_type, f"color type {color_type}"),
            "bit_depth": bit_depth, "width": width, "height": height, "size": f"{width}x{height}",
            "interlaced": interlace == 1}


def broken_chunk(data: bytes) -> str | None:
    """None if every chunk is whole and matches its CRC up to IEND, else what is wrong. PIL's
    decode does not check CRCs, so a flipped bit in pixel data would otherwise pass."""
    view = memoryview(data)
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length = int.from_bytes(view[pos : pos + 4], "big")
        end = pos + 12 + length
        if end > len(data):
            return f"chunk at byte {pos} runs past the end of the file: truncated"
        kind = bytes(view[pos + 4 : pos + 8]).decode("latin-1")
        if zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return f"{kind} chunk at byte {pos} fails its CRC: corrupt"
        if kind == "IEND":
            return None
        pos = end
    return "no IEND chunk: truncated"


_worker_reader: ImageReader | None = None


def _init_worker(reader: ImageReader) -> None:
    global _worker_reader
    ignore_interrupts()
    _worker_reader = reader


def _inspect_in_worker(job: Job) -> dict:
    assert _worker_reader is not None
    return _worker_reader.inspect(job)


def inspect_images(reader: ImageReader, jobs: list[Job]) -> tuple[list[dict], int]:
    threshold = POOL_MIN_IMAGES_DECODE if reader.check_pixels else POOL_MIN_IMAGES_HEADERS
    workers = min(os.cpu_count() or 1, MAX_WORKERS)
    if len(jobs) < threshold or workers < 2:
        return [reader.inspect(job) for job in jobs], 1
    chunksize = max(16, len(jobs) // (workers * 8))
    with pool_context().Pool(workers, initializer=_init_worker, initargs=(reader,)) as pool:
        return pool.map(_inspect_in_worker, jobs, chunksize=chunksize), workers


def integrity_records(records: list[dict]) -> list[dict]:
    """Per image: the train file with the same id or content (test rows), the first train file
    with the same content (train rows), and whether it is blank."""
    train_by_id = {r["Image"]: r["file"] for r in records if r["split"] == "train"}
    first_train: dict[str, str] = {}
    for r in records:
        if r["split"] == "train" and r["content_sha256"] and r["content_sha256"] not in first_train:
            first_train[r["content_sha256"]] = r["file"]
    out = []
    for r in records:
        digest = r["content_sha256"]
        twin = first_train.get(digest) if digest else None
        test = r["split"] == "test"
        out.append({
            "row": r["row"], "Image": r["Image"], "file": r["file"], "split": r["split"], "content_sha256": digest,
            "dhash": r["dhash"],
            "same_id_in_train": train_by_id.get(r["Image"]) if test else None,
            "same_content_in_train": twin if test else None,
            "duplicate_of": twin if not test and twin != r["file"] else None,
            "constant": r["constant"],
            "error": None,
        })
    return out
