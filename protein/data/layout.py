"""Where the competition files sit inside a dataset (folder, zip or S3 prefix): a pure resolution
over the names a source can see, so every kind of source accepts exactly the same layouts.

Accepted, with the dataset root at the top, one or two folders down:

    train.csv, train/<Image>.png, test/<Image>.png, sample_submission.csv   (one folder, today's form)
    Human protein atlas/train.csv, .../train/, .../test/ + submission.csv    (Kaggle's download: the
                                                                             template one level ABOVE)

The rest of the package reads logical names (`TRAIN_CSV`, `SAMPLE_SUBMISSION_CSV`, `train/..`,
`test/..`); a source maps them to where the files really are, so error messages name real paths.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from protein.errors import DataError

TRAIN_CSV = "train.csv"
SAMPLE_SUBMISSION_CSV = "sample_submission.csv"
# Kaggle's "Zero to GANs - Human Protein Classification" download: the images and train.csv sit in
# this folder and the template, with a dummy label 0 per test image, is one level above it.
KAGGLE_FOLDER = "Human protein atlas"
KAGGLE_SUBMISSION_CSV = "submission.csv"
TRAIN_DIR = "train"
TEST_DIR = "test"
LABEL_COLUMNS = ("Image", "Label")
# How deep train.csv may sit: a zip of the Kaggle folder nests it twice
# (jovian-pytorch-z2g/Human protein atlas/train.csv).
MAX_DEPTH = 2
# Real ids are integers; we accept the characters a file name can carry safely on every
# filesystem and object store, and nothing that could walk a path.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")

EXPECTED_LAYOUT = (
    f"expected {TRAIN_CSV} with {TRAIN_DIR}/ and {TEST_DIR}/ beside it, at the top or up to {MAX_DEPTH} "
    f"folders down (e.g. '{KAGGLE_FOLDER}/{TRAIN_CSV}' with {KAGGLE_SUBMISSION_CSV} one level above)"
)


def check_image_id(image_id: str, where: str) -> str:
    if not isinstance(image_id, str) or not SAFE_ID.match(image_id):
        raise DataError(
            f"{where}: image id {image_id!r} is not a safe id "
            "(expected letters, digits, '_' or '-', at most 128 characters)"
        )
    return image_id


@dataclass(frozen=True)
class Layout:
    """root: '' or 'a/' or 'a/b/', the folder holding train.csv, train/ and test/.
    template: the submission template's path relative to the source, or None when there is none."""

    root: str
    template: str | None

    def physical(self, logical: str) -> str:
        if logical == SAMPLE_SUBMISSION_CSV and self.template is not None:
            return self.template
        return self.root + logical


def resolve_layout(
    is_file: Callable[[str], bool], subdirs: Callable[[str], list[str]], where: str, strict: bool
) -> Layout:
    """Find the dataset root. `subdirs(folder)` lists folder names inside `folder` ('' = top).

    Not strict (a local folder), no train.csv anywhere gives the top level, so validation can report
    the missing file with everything else; strict (zip, S3) raises DataError naming `where`."""
    level = [""]
    candidates: list[str] = []
    for _ in range(MAX_DEPTH + 1):
        candidates = [folder for folder in level if is_file(folder + TRAIN_CSV)]
        if candidates:
            break
        level = [f"{folder}{name}/" for folder in level for name in subdirs(folder)
                 if name not in (TRAIN_DIR, TEST_DIR)]
    if len(candidates) > 1:
        found = ", ".join(repr(c) for c in candidates[:5])
        raise DataError(f"{where}: {TRAIN_CSV} found in several folders ({found}); point at the one you mean")
    if not candidates:
        if strict:
            raise DataError(f"{where}: not the competition layout: {EXPECTED_LAYOUT}")
        candidates = [""]
    root = candidates[0]
    template: str | None = None
    if is_file(root + SAMPLE_SUBMISSION_CSV):
        template = root + SAMPLE_SUBMISSION_CSV
    elif root:
        parent = root[:-1].rpartition("/")[0]
        above = f"{parent}/{KAGGLE_SUBMISSION_CSV}" if parent else KAGGLE_SUBMISSION_CSV
        if is_file(above):
            template = above
    return Layout(root, template)


TEMPLATE_HINT = (
    f"expected {SAMPLE_SUBMISSION_CSV} beside {TRAIN_CSV}, or {KAGGLE_SUBMISSION_CSV} one level above the folder "
    f"holding {TRAIN_CSV} (Kaggle's '{KAGGLE_FOLDER}/' download: pass the folder that contains it)"
)
