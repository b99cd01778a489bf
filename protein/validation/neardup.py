"""Near-duplicate images: a 64-bit difference hash per image and the pairs within a Hamming distance.

The hash (dHash) is taken in the decode pass the other pixel checks already make: the image is
shrunk to 9x8 with a box filter (so noise and re-encoding average out), turned grayscale, and
each bit says whether a cell is brighter than its right neighbour. Gradients, not levels: a
uniform brightness shift leaves the hash unchanged, a rescaled or re-compressed copy moves a few
bits, unrelated images differ in about half of the 64 (32 +- 4).

Pairs are found without comparing every image with every other (19,236 x 8,243 would be 158 M
comparisons): the hash is cut into four 16-bit bands. Two hashes at most `max_distance` bits apart
differ by at most `max_distance // 4` bits in at least one band (pigeonhole), so each image is
looked up, per band, among the sorted band values within that many bits of its own (17 probes
for a radius of one), and only those candidates are compared on all 64 bits. A pair found in
several bands is kept in the first, so each pair is counted once.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import combinations

import numpy as np
import pandas as pd
from PIL import Image

from protein.validation.config import MAX_EXAMPLES, MAX_NEAR_DUPLICATE_DISTANCE

HASH_BITS = 64
BANDS = 4
BAND_BITS = HASH_BITS // BANDS
# Candidate pairs expanded at once: bounds memory when many images share a band value.
CHUNK_PAIRS = 2_000_000


def difference_hash(image: Image.Image) -> str:
    """The image's 64-bit dHash as 16 hex digits (a string: JSON and pandas keep all 64 bits)."""
    # One box-filter pass straight to 9x8 (each cell the mean of its ~57x64 pixels), then gray:
    # cheaper than shrinking in steps or converting all 262,144 pixels first.
    cells = np.asarray(image.resize((9, 8), Image.Resampling.BOX).convert("L"), dtype=np.int16)
    bits = cells[:, 1:] > cells[:, :-1]  # (8, 8): brighter than the right neighbour
    return bytes(np.packbits(bits.ravel())).hex()


def hashes_from_hex(values: list[str]) -> np.ndarray:
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


def _band(hashes: np.ndarray, band: int) -> np.ndarray:
    return ((hashes >> np.uint64(band * BAND_BITS)) & np.uint64((1 << BAND_BITS) - 1)).astype(np.int64)


def _probe_masks(radius: int) -> np.ndarray:
    masks = [0]
    for r in range(1, radius + 1):
        masks += [sum(1 << b for b in bits) for bits in combinations(range(BAND_BITS), r)]
    return np.array(masks, dtype=np.int64)


def near_pairs(hashes: np.ndarray, max_distance: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every pair i < j with Hamming distance <= max_distance, as chunks of (i, j, distance)."""
    if not 0 <= max_distance <= MAX_NEAR_DUPLICATE_DISTANCE:
        raise ValueError(f"max_distance must be 0 to {MAX_NEAR_DUPLICATE_DISTANCE} bits, got {max_distance}")
    radius = max_distance // BANDS
    masks = _probe_masks(radius)
    bands = [_band(hashes, b) for b in range(BANDS)]
    for b, values in enumerate(bands):
        order = np.argsort(values, kind="stable")
        ordered = values[order]
        for mask in masks:
            wanted = values ^ mask
            lo = np.searchsorted(ordered, wanted, "left")
            counts = np.searchsorted(ordered, wanted, "right") - lo
            ends = np.cumsum(counts)
            start = 0
            while start < len(values):
                # Queries whose candidates fit in one chunk (at least one query, however many it has).
                base = ends[start - 1] if start else 0
                stop = max(start + 1, int(np.searchsorted(ends, base + CHUNK_PAIRS, "right")))
                yield from _pairs_of(hashes, bands, b, radius, max_distance, order, lo, counts, start, stop)
                start = stop


def _pairs_of(hashes: np.ndarray, bands: list[np.ndarray], band: int, radius: int, max_distance: int,
              order: np.ndarray, lo: np.ndarray, counts: np.ndarray, start: int,
              stop: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    chunk_counts = counts[start:stop]
    total = int(chunk_counts.sum())
    if total == 0:
        return
    i = np.repeat(np.arange(start, stop), chunk_counts)
    firsts = np.repeat(lo[start:stop], chunk_counts)
    offsets = np.arange(total) - np.repeat(np.cumsum(chunk_counts) - chunk_counts, chunk_counts)
    j = order[firsts + offsets]
    keep = i < j
    i, j = i[keep], j[keep]
    distance = np.bitwise_count(hashes[i] ^ hashes[j]).astype(np.int64)
    keep = distance <= max_distance
    for earlier in range(band):  # found there already: count each pair once
        keep &= np.bitwise_count(bands[earlier][i] ^ bands[earlier][j]) > radius
    if keep.any():
        yield i[keep], j[keep], distance[keep]


SCOPES = ("train and test", "within train")


def near_duplicates(frame: pd.DataFrame, max_distance: int, examples: int = MAX_EXAMPLES) -> dict[str, dict]:
    """Per scope, how many pairs of images in `frame` (columns split, file, dhash, content_sha256,
    constant) are near copies, and the closest `examples` of them. Left out: images without a hash
    (not decoded), blank ones (no gradient, so every blank image has the same hash; the blank check
    names them) and pairs with the same pixels (exact duplicates, checked on their own).

    Images with the same pixels are searched once, as one content: a pair of contents a few bits
    apart stands for every pair of their copies (counted as such), and its example is one pair of
    them. Searched copy by copy, n copies of one image made n^2/2 candidate pairs in every band."""
    usable = frame[frame["dhash"].notna() & (frame["constant"] != True)  # noqa: E712 - object column
                   & frame["split"].isin(["train", "test"])]
    files = usable["file"].to_numpy(dtype=object)
    is_test = (usable["split"] == "test").to_numpy()
    content = usable["content_sha256"].to_numpy(dtype=object, copy=True)
    missing = pd.isna(content)  # no content hash: never taken for another image's copy
    content[missing] = [f"row {k}" for k in np.flatnonzero(missing)]
    codes = pd.factorize(pd.Series(content))[0]
    contents = int(codes.max()) + 1 if len(codes) else 0

    def first_rows(mask: np.ndarray) -> np.ndarray:
        """Each content's first row among those in mask (-1: none there)."""
        first = np.full(contents, -1, dtype=np.int64)
        rows = np.flatnonzero(mask)
        ids, at = np.unique(codes[rows], return_index=True)
        first[ids] = rows[at]
        return first

    first_test, first_train = first_rows(is_test), first_rows(~is_test)
    tests = np.bincount(codes, weights=is_test, minlength=contents).astype(np.int64)
    trains = np.bincount(codes, minlength=contents) - tests
    hashes = hashes_from_hex(usable["dhash"].to_numpy(dtype=object)[first_rows(np.ones(len(codes), bool))].tolist())

    found = {scope: {"count": 0, "closest": np.empty((0, 3), dtype=np.int64)} for scope in SCOPES}
    for a, b, distance in near_pairs(hashes, max_distance):
        # The example across splits: a test copy of a beside a train copy of b where both exist, else
        # a train copy of a beside a test copy of b.
        test_in_a = (tests[a] > 0) & (trains[b] > 0)
        cross_pairs = tests[a] * trains[b] + trains[a] * tests[b]
        cross = (np.where(test_in_a, first_test[a], first_train[a]), np.where(test_in_a, first_train[b], first_test[b]))
        within_pairs = trains[a] * trains[b]
        within = (first_train[a], first_train[b])
        for scope, pairs, (i, j) in ((SCOPES[0], cross_pairs, cross), (SCOPES[1], within_pairs, within)):
            in_scope = pairs > 0
            if not in_scope.any():
                continue
            found[scope]["count"] += int(pairs[in_scope].sum())
            # Keep only the closest few so far: a folder of near copies must not hold every pair.
            low, high = np.minimum(i, j)[in_scope], np.maximum(i, j)[in_scope]
            both = np.concatenate([found[scope]["closest"], np.column_stack([distance[in_scope], low, high])])
            found[scope]["closest"] = both[np.lexsort((both[:, 2], both[:, 1], both[:, 0]))][:examples]
    out = {}
    for scope, result in found.items():
        pairs = []
        for distance, i, j in result["closest"].tolist():
            # A test image first (it is the one that leaks); within train, the later row first.
            first, second = (i, j) if is_test[i] or (not is_test[j] and i > j) else (j, i)
            pairs.append({"file": files[first], "near": files[second], "distance": distance})
        out[scope] = {"count": result["count"], "pairs": pairs}
    return out
