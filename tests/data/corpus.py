"""A corpus of broken datasets for the validation suites: a tiny valid base and one fault each.

Each fault names the single (suite, expectation, column) it must trip and one key/value the first
unexpected example must carry, so the test checks that the user is shown the right row or file.
"""

from __future__ import annotations

import io
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.helpers import write_png

SIZE = 64
# Labels are sets: "6 4" and "9 5 0" are valid as written, in that order.
BASE_LABELS = {"101": "0", "102": "6 4", "103": "2", "104": "1 3", "105": "9 5 0", "106": "7"}
BASE_TEST = ["201", "202", "203"]


def write_csv(path: Path, header: str, rows: list[tuple[str, str]], bom: bool = False, eol: str = "\n") -> None:
    text = eol.join([header, *(f"{a},{b}" for a, b in rows)]) + eol
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())


def write_base(root: Path, labels: dict[str, str] | None = None, test_ids: list[str] | None = None) -> Path:
    labels = BASE_LABELS if labels is None else labels
    test_ids = BASE_TEST if test_ids is None else test_ids
    root.mkdir(parents=True)
    write_csv(root / "train.csv", "Image,Label", list(labels.items()))
    write_csv(root / "sample_submission.csv", "Image,Label", [(t, "0") for t in test_ids])
    for i, image_id in enumerate(labels):
        write_png(root / "train" / f"{image_id}.png", SIZE, seed=i)
    for i, image_id in enumerate(test_ids):
        write_png(root / "test" / f"{image_id}.png", SIZE, seed=100 + i)
    return root


def png_16bit_rgb(size: int) -> bytes:
    """A valid 16-bit-per-channel RGB PNG (PIL cannot write one)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + bytes(size * 6)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * size)) + chunk(b"IEND", b""))


def _rewrite_labels(root: Path, labels: dict[str, str] | list[tuple[str, str]], header: str = "Image,Label") -> None:
    rows = list(labels.items()) if isinstance(labels, dict) else labels
    write_csv(root / "train.csv", header, rows)


def _missing_column(root: Path) -> None:
    (root / "train.csv").write_text("Image\n" + "".join(f"{k}\n" for k in BASE_LABELS))


def _out_of_range_label(root: Path) -> None:
    _rewrite_labels(root, {**BASE_LABELS, "103": "10"})


def _repeated_label(root: Path) -> None:
    _rewrite_labels(root, {**BASE_LABELS, "104": "1 1"})


def _ragged_row(root: Path) -> None:
    rows = list(BASE_LABELS.items())
    rows[2] = ("103", "2,extra")  # one field too many: pandas would shift every column of the file
    _rewrite_labels(root, rows)


def _duplicate_id(root: Path) -> None:
    rows = list(BASE_LABELS.items())
    rows[1] = ("101", rows[1][1])  # 102.png stays on disk, unlisted: a warning, not a failure
    _rewrite_labels(root, rows)


def _path_traversal_id(root: Path) -> None:
    rows = list(BASE_LABELS.items())
    rows[0] = ("../101", rows[0][1])
    _rewrite_labels(root, rows)


def _missing_image(root: Path) -> None:
    (root / "train" / "103.png").unlink()


def _truncated_png(root: Path) -> None:
    path = root / "train" / "104.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_pixels(root: Path) -> None:
    """Garbage in the middle of the pixel data (IDAT), header and IEND trailer intact: only a
    full read finds it."""
    path = root / "train" / "101.png"
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 4 + 200
    data[start : start + 256] = bytes(range(256))
    path.write_bytes(bytes(data))


def _non_png(root: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8), "RGB").save(buffer, "JPEG")
    (root / "train" / "105.png").write_bytes(buffer.getvalue())


def _zero_byte(root: Path) -> None:
    (root / "train" / "106.png").write_bytes(b"")


def _wrong_size(root: Path) -> None:
    write_png(root / "train" / "101.png", SIZE // 2, seed=7)


def _grayscale(root: Path) -> None:
    Image.fromarray(np.full((SIZE, SIZE), 40, np.uint8), "L").save(root / "train" / "102.png")


def _sixteen_bit(root: Path) -> None:
    (root / "train" / "103.png").write_bytes(png_16bit_rgb(SIZE))


def _test_id_in_train(root: Path) -> None:
    """A test image named like a train image: the same id on both sides is leakage."""
    (root / "test" / "203.png").rename(root / "test" / "101.png")
    write_csv(root / "sample_submission.csv", "Image,Label", [("201", "0"), ("202", "0"), ("101", "0")])


def _test_content_in_train(root: Path) -> None:
    """The pixels of train/102.png re-encoded (other compression) as test/202.png."""
    with Image.open(root / "train" / "102.png") as image:
        image.save(root / "test" / "202.png", compress_level=1)


def _oversize_image(root: Path) -> None:
    """A file over the configured cap (200,000 bytes in these tests): refused unread."""
    path = root / "train" / "104.png"
    data = path.read_bytes()
    path.write_bytes(data + bytes(250_000 - len(data)))


def _header_only_csv(root: Path) -> None:
    (root / "train.csv").write_text("Image,Label\n")


def _test_mismatch(root: Path) -> None:
    (root / "test" / "203.png").unlink()


@dataclass(frozen=True)
class Fault:
    name: str
    apply: Callable[[Path], None]
    suite: str
    expectation: str
    column: str | None
    example: dict[str, Any]  # items the first unexpected example must contain


FAULTS = [
    Fault("missing_column", _missing_column, "labels", "expect_column_values_to_be_in_set", "header",
          {"file": "train.csv", "value": "Image"}),
    Fault("out_of_range_label", _out_of_range_label, "labels", "expect_column_values_to_match_regex", "Label",
          {"row": 4, "Image": "103", "value": "10"}),
    Fault("repeated_label", _repeated_label, "labels", "expect_column_values_to_be_in_set", "label_ids_distinct",
          {"row": 5, "Image": "104", "Label": "1 1"}),
    Fault("ragged_row", _ragged_row, "labels", "expect_column_values_to_be_in_set", "fields",
          {"row": 4, "Image": "103", "value": 3}),
    Fault("duplicate_id", _duplicate_id, "labels", "expect_column_values_to_be_unique", "Image",
          {"row": 2, "Image": "101"}),
    Fault("path_traversal_id", _path_traversal_id, "labels", "expect_column_values_to_match_regex", "Image",
          {"row": 2, "Image": "../101"}),
    Fault("missing_image", _missing_image, "files", "expect_column_values_to_be_in_set", "exists",
          {"row": 4, "file": "train/103.png"}),
    Fault("truncated_png", _truncated_png, "images", "expect_png_to_decode", "decodes",
          {"row": 5, "file": "train/104.png", "value": False}),
    Fault("corrupt_pixels", _corrupt_pixels, "images", "expect_png_to_decode", "decodes",
          {"row": 2, "file": "train/101.png", "value": False}),
    Fault("non_png", _non_png, "images", "expect_column_values_to_be_in_set", "format",
          {"file": "train/105.png", "value": "JPEG"}),
    Fault("zero_byte", _zero_byte, "images", "expect_column_values_to_be_between", "bytes",
          {"file": "train/106.png", "value": 0}),
    Fault("wrong_size", _wrong_size, "images", "expect_column_values_to_be_in_set", "size",
          {"file": "train/101.png", "value": f"{SIZE // 2}x{SIZE // 2}"}),
    Fault("grayscale", _grayscale, "images", "expect_column_values_to_be_in_set", "mode",
          {"file": "train/102.png", "value": "L"}),
    Fault("sixteen_bit", _sixteen_bit, "images", "expect_column_values_to_be_in_set", "bit_depth",
          {"file": "train/103.png", "value": 16}),
    Fault("header_only_csv", _header_only_csv, "labels", "expect_column_values_to_be_between", "rows",
          {"file": "train.csv", "value": 0}),
    Fault("test_id_in_train", _test_id_in_train, "integrity", "expect_column_values_to_be_null", "same_id_in_train",
          {"file": "test/101.png", "value": "train/101.png"}),
    Fault("test_content_in_train", _test_content_in_train, "integrity", "expect_no_content_overlap_between_splits",
          None, {"file": "test/202.png", "value": "train/102.png"}),
    Fault("oversize_image", _oversize_image, "images", "expect_column_values_to_be_between", "bytes",
          {"file": "train/104.png", "value": 250_000}),
    Fault("test_folder_mismatch", _test_mismatch, "files", "expect_column_pair_values_to_be_equal",
          "in_submission, in_folder", {"row": 4, "file": "test/203.png", "value": [True, False]}),
]


def make_faulty(base: Path, out: Path, fault: Fault) -> Path:
    shutil.copytree(base, out)
    fault.apply(out)
    return out


def bom_crlf(root: Path) -> None:
    """Windows-saved CSVs: UTF-8 BOM and CRLF line endings."""
    write_csv(root / "train.csv", "Image,Label", list(BASE_LABELS.items()), bom=True, eol="\r\n")
    write_csv(root / "sample_submission.csv", "Image,Label", [(t, "0") for t in BASE_TEST], bom=True, eol="\r\n")


def unsorted_label_sets(root: Path) -> None:
    """Every multi-label cell in descending order (the real file has '6 4')."""
    labels = {k: " ".join(sorted(v.split(), reverse=True)) for k, v in BASE_LABELS.items()}
    _rewrite_labels(root, labels)


VALID_VARIANTS = {"bom_crlf": bom_crlf, "unsorted_label_sets": unsorted_label_sets}
