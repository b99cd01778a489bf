"""The competition dataset, read-only, from a folder, a zip, an s3:// prefix or an s3:// zip.

- layout: where train.csv, train/, test/ and the submission template sit (Kaggle's form included)
- sources: local folder and zip sources; s3: S3 prefixes and zips through a local download cache;
  opening: `open_dataset`, the one way from a URI or path to its source
- tables: strict CSV parsing and `load_competition`
- png: strict PNG decoding and the one resize
- digests, fingerprint: content digests and the host-independent data fingerprint
- manifest: dataset manifests (full copy, content-addressed) and content-object keys
- push: `protein datasets push/list`, immutable content-addressed datasets in the object store;
  pushed_folder: such a dataset in a local-folder store; dataset_gc: `protein datasets gc`
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protein.data.digests import FileDigest, data_cache_dir
from protein.data.fingerprint import fingerprint, fingerprint_of
from protein.data.layout import (
    KAGGLE_FOLDER,
    KAGGLE_SUBMISSION_CSV,
    LABEL_COLUMNS,
    SAFE_ID,
    SAMPLE_SUBMISSION_CSV,
    TEST_DIR,
    TRAIN_CSV,
    TRAIN_DIR,
    Layout,
    check_image_id,
    resolve_layout,
)
from protein.data.opening import open_dataset
from protein.data.sources import DatasetSource, FolderSource, ZipSource
from protein.lazy_exports import lazy_exports

if TYPE_CHECKING:  # loaded on first use (below); named here for type checkers
    from protein.data.png import MAX_IMAGE_PIXELS, PNG_SIGNATURE, decode_png, load_image, png_end
    from protein.data.tables import (
        MAX_CSV_BYTES,
        CompetitionData,
        blank_header_problem,
        csv_line,
        load_competition,
        parse_csv_bytes,
        parse_labels_table,
        read_csv_table,
    )

# Decoding and table parsing load on first use: they import numpy, Pillow and pandas, which a process
# that only opens, lists or fingerprints a dataset (a nightly that finds its data unchanged, a push)
# would otherwise import at start (docs/testing.md: ~0.2 CPU-s a run).
_LAZY = {name: "png" for name in ("MAX_IMAGE_PIXELS", "PNG_SIGNATURE", "decode_png", "load_image", "png_end")} | {
    name: "tables" for name in ("MAX_CSV_BYTES", "CompetitionData", "blank_header_problem", "csv_line",
                                "load_competition", "parse_csv_bytes", "parse_labels_table", "read_csv_table")}

__all__ = [
    "open_dataset",
    "KAGGLE_FOLDER",
    "KAGGLE_SUBMISSION_CSV",
    "LABEL_COLUMNS",
    "MAX_CSV_BYTES",
    "MAX_IMAGE_PIXELS",
    "PNG_SIGNATURE",
    "SAFE_ID",
    "SAMPLE_SUBMISSION_CSV",
    "TEST_DIR",
    "TRAIN_CSV",
    "TRAIN_DIR",
    "CompetitionData",
    "DatasetSource",
    "FileDigest",
    "FolderSource",
    "Layout",
    "ZipSource",
    "blank_header_problem",
    "check_image_id",
    "csv_line",
    "data_cache_dir",
    "decode_png",
    "fingerprint",
    "fingerprint_of",
    "load_competition",
    "load_image",
    "parse_csv_bytes",
    "parse_labels_table",
    "png_end",
    "read_csv_table",
    "resolve_layout",
]


__getattr__ = lazy_exports(__name__, globals(), _LAZY)
