"""PNG encoding like the competition's files, so that decoding a synthetic image costs what
decoding a real one does (the data path's benchmarks depend on it).

The real PNGs use adaptive per-row filters (Sub, Up and Paeth rows in the reference image) and a
deflate stream; unfiltered, RLE-compressed rows decoded in half the real file's time. Filters
are chosen per row as libpng does (the smallest sum of absolute filtered bytes), vectorised over
rows. zlib level 1, not the default 6: level 6 made these images decode about 1.5x slower than
the real one and cost several times the rendering to encode, level 1 decodes within 20 %
(bench measurement in docs/gate.md).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZLIB_LEVEL = 1


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def filter_rows(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, 1 + 3W) uint8 scanlines, each led by its filter type (0-4)."""
    height, width, _ = rgb.shape
    x = rgb.reshape(height, width * 3).astype(np.int16)
    left = np.zeros_like(x)
    left[:, 3:] = x[:, :-3]
    up = np.zeros_like(x)
    up[1:] = x[:-1]
    up_left = np.zeros_like(x)
    up_left[1:, 3:] = x[:-1, :-3]
    # Paeth predictor (PNG spec 9.4): the neighbour closest to left + up - up_left.
    dist_left, dist_up = np.abs(up - up_left), np.abs(left - up_left)
    dist_corner = np.abs(left + up - 2 * up_left)
    paeth = np.where((dist_left <= dist_up) & (dist_left <= dist_corner), left,
                     np.where(dist_up <= dist_corner, up, up_left))
    candidates = np.stack([x, x - left, x - up, x - ((left + up) >> 1), x - paeth]).astype(np.uint8)  # (5, H, 3W)
    cost = np.abs(candidates.view(np.int8).astype(np.int32)).sum(axis=2)  # (5, H)
    best = cost.argmin(axis=0)
    raw = np.empty((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 0] = best
    raw[:, 1:] = candidates[best, np.arange(height)]
    return raw


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit truecolour, one IDAT)."""
    height, width, _ = rgb.shape
    data = zlib.compress(filter_rows(rgb).tobytes(), ZLIB_LEVEL)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
