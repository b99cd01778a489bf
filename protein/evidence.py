"""Evidence a GPU host's scoring leaves for the CPU host to check, and the checks.

The trainer role (the GPU host) may write runs/<run>/, so a verdict or a CSV lying there proves
nothing by where it lies: whoever holds the trainer's keys could have written it. The scoring step
therefore also writes the per-row probabilities it computed (runs/<run>/gate-probs.npz,
runs/<run>/test-probs.npz), and the CPU host

1. derives the gate's evaluation and the submission from those probabilities itself, with the
   targets of the dataset it validated and the thresholds of the model versions it resolves from
   the registry, and refuses a record or a CSV that differs from what it derived;
2. scores a random sample of K rows itself, on CPU, with the weights it downloads from the
   registry (checked against their SHA-256 in model.json), and refuses probabilities that differ
   from its own by more than a tolerance. The seed is drawn here, after the evidence is read, so
   the GPU host cannot know which rows will be checked.

A forger who changes a fraction f of the rows (the least that moves a metric by f) passes the
spot-check with probability (1 - f)^K; docs/security.md gives the numbers and the cost.
"""

from __future__ import annotations

import io
import logging
import secrets
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from protein.cache import decode_all
from protein.data import CompetitionData
from protein.errors import EvidenceRefused
from protein.labels import LABELS
from protein.modeling.predict import Predictor

log = logging.getLogger(__name__)

GATE_PROBS = "gate-probs.npz"
TEST_PROBS = "test-probs.npz"
# bf16 autocast on the GPU against fp32 here: sigmoid outputs agree to about 1e-2 (bf16 keeps
# 8 bits of mantissa). Not yet measured on a GPU; docs/security.md says how to calibrate it.
DEFAULT_ATOL = 0.05
DEFAULT_ROWS = 64


@dataclass(frozen=True)
class SpotCheck:
    """How many rows the CPU host scores itself, and how far its probabilities may differ."""

    rows: int = DEFAULT_ROWS
    atol: float = DEFAULT_ATOL

    def __post_init__(self) -> None:
        if self.rows < 1 or not 0 < self.atol < 1:
            raise ValueError(f"a spot-check needs rows >= 1 and 0 < atol < 1; got {self}")


def encode_probs(scored: dict[str, tuple[list[str], np.ndarray]]) -> bytes:
    """One .npz of named (N, C) float32 probabilities, each with its row ids ("<name>_ids")."""
    contents: dict[str, np.ndarray] = {}
    for name, (ids, probs) in scored.items():
        contents[name] = np.asarray(probs, dtype=np.float32)
        contents[f"{name}_ids"] = np.asarray(ids, dtype=np.str_)
    buffer = io.BytesIO()
    np.savez(buffer, **contents)
    return buffer.getvalue()


# Bytes of a .npy header and of an archive's directory and member headers, generously.
NPY_HEADER_BYTES = 4096


def member_bounds(expected: dict[str, list[str]]) -> dict[str, int]:
    """The most bytes each member of an honest .npz of these probabilities holds: float64 at most,
    ids as numpy's fixed-width UTF-32 text of the longest expected id."""
    bounds: dict[str, int] = {}
    for name, ids in expected.items():
        longest = max((len(i) for i in ids), default=1)
        bounds[name] = len(ids) * len(LABELS) * 8 + NPY_HEADER_BYTES
        bounds[f"{name}_ids"] = len(ids) * 4 * longest + NPY_HEADER_BYTES
    return bounds


def probs_bound(expected: dict[str, list[str]]) -> int:
    """The most bytes an honest (uncompressed, np.savez) .npz of these probabilities takes."""
    bounds = member_bounds(expected)
    return sum(bounds.values()) + NPY_HEADER_BYTES * (len(bounds) + 1)


def read_npy_member(archive: zipfile.ZipFile, name: str, bound: int, where: str) -> np.ndarray:
    """One .npy member, read only as far as ``bound`` bytes: the directory's size first, then the
    shape and type its header declares, then exactly those bytes. Object arrays are refused."""
    from numpy.lib import format as npy

    info = archive.getinfo(name)
    if info.file_size > bound:
        raise EvidenceRefused(f"{where}: member {name} holds {info.file_size} bytes, more than the {bound} its rows "
                              "take")
    with archive.open(info) as member:
        version = npy.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(member)
        else:
            raise EvidenceRefused(f"{where}: member {name} is .npy format {version}, expected 1.0 or 2.0")
        if dtype.hasobject:
            raise EvidenceRefused(f"{where}: member {name} holds Python objects")
        count = 1
        for side in shape:
            count *= int(side)
        size = count * dtype.itemsize
        if size > bound:
            raise EvidenceRefused(f"{where}: member {name} declares {shape} {dtype}, {size} bytes, more than the "
                                  f"{bound} its rows take")
        data = member.read(size)
    if len(data) != size:
        raise EvidenceRefused(f"{where}: member {name} ends after {len(data)} of its {size} bytes")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def decode_probs(raw: bytes, where: str, expected: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The probabilities of each name in `expected`, refused unless they are finite, in [0, 1],
    one row per expected id, in that order. Never unpickles. Only the expected members
    (``<name>.npy``, ``<name>_ids.npy``) are read, each only when the archive's directory and then
    its own header say it holds no more than an honest one: a deflated member of zeros expands a
    thousandfold, a bzip2 one far more. The archive is read with zipfile, member by exact name:
    numpy's NpzFile maps "x" to a member named "x" before "x.npy", so a check of "x.npy" and a load
    of "x" could read two different members."""
    bounds = member_bounds(expected)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            present = set(archive.namelist())
            stored = {member: read_npy_member(archive, f"{member}.npy", bound, where)
                      for member, bound in bounds.items() if f"{member}.npy" in present}
    except EvidenceRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable archive is one refusal
        raise EvidenceRefused(f"{where}: not a readable .npz of probabilities ({type(exc).__name__})") from None
    probs: dict[str, np.ndarray] = {}
    for name, ids in expected.items():
        array, stored_ids = stored.get(name), stored.get(f"{name}_ids")
        if array is None or stored_ids is None:
            raise EvidenceRefused(f"{where}: no probabilities for the {name}")
        if stored_ids.tolist() != list(ids):
            raise EvidenceRefused(f"{where}: the {name}'s rows are not the {len(ids)} rows the CPU host expects "
                                  f"(found {stored_ids.size})")  # a 0-d array has no len()
        if array.shape != (len(ids), len(LABELS)) or array.dtype.kind != "f":
            raise EvidenceRefused(f"{where}: the {name}'s probabilities have shape {array.shape} {array.dtype}, "
                                  f"expected ({len(ids)}, {len(LABELS)}) floats")
        if not np.all(np.isfinite(array)) or array.min(initial=0.0) < 0 or array.max(initial=0.0) > 1:
            raise EvidenceRefused(f"{where}: the {name}'s probabilities are not all in [0, 1]")
        probs[name] = array.astype(np.float32)
    return probs


def draw_seed() -> int:
    """Drawn on the CPU host after the evidence is read: the GPU host cannot predict it."""
    return secrets.randbits(63)


def spot_check(predictor: Predictor, data: CompetitionData, split: str, ids: list[str], claimed: np.ndarray,
               check: SpotCheck, seed: int, where: str, name: str) -> dict[str, Any]:
    """Score `check.rows` rows of `ids` (drawn with `seed`) with `predictor` and compare with the
    claimed probabilities; EvidenceRefused names the first row that differs too much."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(ids), size=min(check.rows, len(ids)), replace=False))
    path_of = data.train_path if split == "train" else data.test_path
    rels = [path_of(ids[i]) for i in picked]
    images = np.empty((len(rels), predictor.image_size, predictor.image_size, 3), dtype=np.uint8)
    # Decoded from the dataset itself, never from cache/ in the store: the trainer role writes that.
    decode_all(data.source, rels, predictor.image_size, images, workers=1)
    own = predictor.predict_probs(images)
    diff = np.abs(own - claimed[picked])
    worst = int(np.argmax(diff.max(axis=1)))
    max_diff = float(diff.max())
    if max_diff > check.atol:
        image_id = ids[picked[worst]]
        raise EvidenceRefused(f"{where}: the {name}'s probabilities for image {image_id} differ from what the CPU "
                              f"host computes with the registered weights by {max_diff:.4f} (tolerance "
                              f"{check.atol}); the scoring host's results are refused")
    log.info("spot-check of %s: %d rows scored here agree within %.2g (max %.2g, seed %d)", name, len(picked),
             check.atol, max_diff, seed)
    return {"rows": len(picked), "seed": seed, "max_abs_diff": max_diff, "atol": check.atol}
