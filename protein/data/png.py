"""Decoding one competition image: strict PNG checks, then the one resize every consumer uses."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from protein.errors import DataError

# Decompression-bomb guard: the competition images are 512x512; refuse anything absurdly big
# before PIL allocates it.
MAX_IMAGE_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
