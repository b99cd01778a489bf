"""PNG encoding like the competition's files, so that decoding a synthetic image costs what
decoding a real one does (the data path's benchmarks depend on it).

The reference real PNG filters its rows with Sub (64 %), Up (22 %) and Paeth (14 %) and deflates
them. Unfiltered RLE rows decoded in half its time; libpng's heuristic over all five filters
picks Paeth for nearly every row of these images, which made them decode ~1.3-1.5x slower (Paeth
is the costly filter to undo). So rows choose among Sub, Up and Paeth by libpng's measure (the
smallest sum of absolute filtered bytes), with Paeth taken only when it wins by 30 %, which gives
the real file's mix. zlib level 1, not the default 6: level 6 cost several times the rendering to
encode and decoded slower still. bench/synth_decode.py measures the result against the real file.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZLIB_LEVEL = 1
PAETH_PENALTY = 1.3


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _paeth(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    """PNG spec 9.4: the neighbour closest to left + up - up_left."""
    dist_left, dist_up = np.abs(up - up_left), np.abs(left - up_left)
    dist_corner = np.abs(left + up - 2 * up_left)
    return np.where((dist_left <= dist_up) & (dist_left <= dist_corner), left,
                    np.where(dist_up <= dist_corner, up, up_left))


def _neighbours(x: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """left, up and up-left (int16) of every byte in the given rows of x (uint8 (H, 3W)),
    zero outside the image."""
    current = x[rows].astype(np.int16)
    above = np.zeros_like(current)
    has_above = rows > 0
    above[has_above] = x[rows[has_above] - 1]
    left = np.zeros_like(current)
    left[:, 3:] = current[:, :-3]
    up_left = np.zeros_like(current)
    up_left[:, 3:] = above[:, :-3]
    return left, above, up_left


def filter_rows(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, 1 + 3W) uint8 scanlines, each led by its filter type (1, 2 or 4)."""
    height, width, _ = rgb.shape
    x = np.ascontiguousarray(rgb).reshape(height, width * 3)
    # The choice is a heuristic: score it on every 7th byte (all three channels in turn).
    every = np.arange(height)
    columns = np.arange(3, width * 3, 7)
    sample = x[:, columns].astype(np.int16)
    left = x[:, columns - 3].astype(np.int16)
    up = np.zeros_like(sample)
    up[1:] = sample[:-1]
    up_left = np.zeros_like(left)
    up_left[1:] = left[:-1]
    cost = np.stack([np.abs((sample - p).astype(np.uint8).view(np.int8).astype(np.int32)).sum(axis=1)
                     for p in (left, up, _paeth(left, up, up_left))]).astype(np.float64)  # (3, H)
    cost[2] *= PAETH_PENALTY
    best = cost.argmin(axis=0)
    raw = np.empty((height, width * 3 + 1), dtype=np.uint8)
    raw[:, 0] = np.array([1, 2, 4], dtype=np.uint8)[best]  # Sub, Up, Paeth
    body = raw[:, 1:]
    # uint8 arithmetic wraps modulo 256, which is what PNG filtering is.
    sub = every[best == 0]
    body[sub, :3] = x[sub, :3]
    body[sub, 3:] = x[sub, 3:] - x[sub, :-3]
    up_rows = every[best == 1]
    body[up_rows] = x[up_rows] - np.where((up_rows > 0)[:, None], x[np.maximum(up_rows - 1, 0)], 0).astype(np.uint8)
    paeth_rows = every[best == 2]
    if paeth_rows.size:
        body[paeth_rows] = (x[paeth_rows] - _paeth(*_neighbours(x, paeth_rows))).astype(np.uint8)
    return raw


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (8-bit truecolour, one IDAT)."""
    height, width, _ = rgb.shape
    data = zlib.compress(filter_rows(rgb).tobytes(), ZLIB_LEVEL)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
