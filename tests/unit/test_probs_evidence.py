"""The scoring host's probabilities are read only up to what an honest archive of them takes
(protein.evidence.decode_probs): the trainer role writes them, the CPU host reads them."""

from __future__ import annotations

import io
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from protein.errors import EvidenceRefused
from protein.evidence import decode_probs, encode_probs, probs_bound

IDS = [f"img{i:03d}" for i in range(5)]


def honest() -> bytes:
    return encode_probs({"challenger": (IDS, np.full((5, 10), 0.5, dtype=np.float32))})


def with_member(raw: bytes, name: str, array: np.ndarray | bytes, filename: str | None = None,
                compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """The archive with one more (or a replaced) member, compressed."""
    filename = filename or f"{name}.npy"
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as source, zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            if info.filename != filename:
                target.writestr(info, source.read(info))
        if isinstance(array, bytes):
            body = array
        else:
            member = io.BytesIO()
            np.save(member, array)
            body = member.getvalue()
        target.writestr(filename, body, compress_type=compression)
    return buffer.getvalue()


@contextmanager
def memory_peak() -> Iterator[Callable[[], int]]:
    """Traces this process's allocations; the callable gives the peak so far, in bytes."""
    tracemalloc.start()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_honest_archive_fits_its_bound_and_reads_back() -> None:
    raw = honest()
    assert len(raw) <= probs_bound({"challenger": IDS})
    assert decode_probs(raw, "x", {"challenger": IDS})["challenger"].shape == (5, 10)


def test_an_expected_member_larger_than_its_rows_is_refused_unread() -> None:
    """A deflated member of zeros expands a thousandfold: it was loaded whole before any check."""
    bomb = with_member(honest(), "challenger", np.zeros((2_000_000, 10)))  # 160 MB, deflated to ~155 KB
    assert len(bomb) < 1_000_000
    with memory_peak() as peak:
        with pytest.raises(EvidenceRefused,
                           match=r"x: member challenger\.npy holds 160000128 bytes, more than the 4496"):
            decode_probs(bomb, "x", {"challenger": IDS})
        assert peak() < 20_000_000


def test_a_member_nobody_asked_for_is_never_read() -> None:
    extra = with_member(honest(), "padding", np.zeros((2_000_000, 10)))
    with memory_peak() as peak:
        assert decode_probs(extra, "x", {"challenger": IDS})["challenger"].shape == (5, 10)
        assert peak() < 20_000_000


def test_ids_that_are_not_a_list_of_rows_are_refused_in_one_line() -> None:
    scalar_ids = with_member(honest(), "challenger_ids", np.array("img000"))  # 0-d: len() raised TypeError
    with pytest.raises(EvidenceRefused, match="rows are not the 5 rows the CPU host expects"):
        decode_probs(scalar_ids, "x", {"challenger": IDS})


def test_a_member_named_like_a_key_is_never_read_in_place_of_its_npy() -> None:
    """numpy's NpzFile maps "challenger" to a member named "challenger" before "challenger.npy": the
    size check read one member and the load the other (a bzip2 body of zeros, 991 bytes, asked for
    131 MB; 1.4 MB would ask for terabytes)."""
    shadow = with_member(honest(), "challenger", b"\0" * 50_000_000, filename="challenger",
                         compression=zipfile.ZIP_BZIP2)
    assert len(shadow) < 5_000
    with memory_peak() as peak:
        assert decode_probs(shadow, "x", {"challenger": IDS})["challenger"].shape == (5, 10)
        assert peak() < 20_000_000


def test_a_header_that_declares_more_rows_than_it_holds_is_refused_unread() -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (1_000_000_000, 10)})
    lying = with_member(honest(), "challenger", header.getvalue() + b"\0" * 64)
    with memory_peak() as peak:
        with pytest.raises(EvidenceRefused, match=r"member challenger\.npy declares \(1000000000, 10\) float64"):
            decode_probs(lying, "x", {"challenger": IDS})
        assert peak() < 20_000_000
