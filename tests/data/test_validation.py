"""Validation suites on good and broken datasets: each fault fails exactly its expectation."""

from __future__ import annotations

import builtins
import errno
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protein.errors import DataError
from protein.labels import parse_label_set
from protein.validation import (
    REFERENCE_PROFILE,
    ValidationConfig,
    ValidationReport,
    profile_labels,
    run_validation,
    validate_dataset,
)
from tests.data.corpus import FAULTS, SIZE, VALID_VARIANTS, Fault, make_faulty, write_base

REAL_TRAIN_CSV = Path(__file__).resolve().parents[2].parent / "shared/data/real/train.csv"
CONFIG = ValidationConfig(image_size=SIZE, max_image_bytes=200_000)


def failure_names(report: ValidationReport) -> list[tuple[str, str, str | None]]:
    return [(f["suite"], f["expectation"], f["column"]) for f in report.failures]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base(tmp_path_factory.mktemp("corpus") / "base")


def test_valid_base_passes(base: Path) -> None:
    report = validate_dataset(base, CONFIG)
    assert report.success, report.summary_lines()
    assert report.failures == [] and report.summary_lines() == []
    assert report.statistics["images_checked"] == 9
    # Six images cannot be compared with the real distribution: reported, never failed.
    assert {w["suite"] for w in report.warnings} <= {"distribution"}
    assert len(report.data_fingerprint) == 16
    json.dumps(report.to_dict())


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_fails_exactly_its_expectation(base: Path, tmp_path: Path, fault: Fault) -> None:
    report = validate_dataset(make_faulty(base, tmp_path / fault.name, fault), CONFIG)
    assert not report.success
    assert failure_names(report) == [(fault.suite, fault.expectation, fault.column)], report.summary_lines()
    failure = report.failures[0]
    assert failure["unexpected_count"] >= 1 and failure["message"]
    assert fault.example.items() <= failure["examples"][0].items(), failure["examples"]
    lines = report.summary_lines()
    assert len(lines) == 1 and fault.expectation in lines[0]


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.name in ("truncated_png", "non_png", "wrong_size")],
                         ids=lambda f: f.name)
def test_header_only_mode_still_catches_image_faults(base: Path, tmp_path: Path, fault: Fault) -> None:
    config = ValidationConfig(image_size=SIZE, check_pixels=False)
    report = validate_dataset(make_faulty(base, tmp_path / fault.name, fault), config)
    assert failure_names(report) == [(fault.suite, fault.expectation, fault.column)]
    assert report.statistics["pixel_check"] == "header and IEND trailer only"


def test_header_only_mode_cannot_see_corrupt_pixels(base: Path, tmp_path: Path) -> None:
    # The price of skipping the full read: damage between header and trailer goes unnoticed.
    fault = next(f for f in FAULTS if f.name == "corrupt_pixels")
    report = validate_dataset(make_faulty(base, tmp_path / "ds", fault), ValidationConfig(image_size=SIZE,
                                                                                           check_pixels=False))
    assert report.success


def test_summary_line_points_at_the_row(base: Path, tmp_path: Path) -> None:
    fault = next(f for f in FAULTS if f.name == "path_traversal_id")
    (line,) = validate_dataset(make_faulty(base, tmp_path / "ds", fault), CONFIG).summary_lines()
    assert line.startswith("labels: expect_column_values_to_match_regex(Image): 1 of 6 rows")
    assert "'../101'" in line and "row 2" in line


@pytest.mark.parametrize("variant", sorted(VALID_VARIANTS))
def test_valid_variants_pass(base: Path, tmp_path: Path, variant: str) -> None:
    root = tmp_path / variant
    shutil.copytree(base, root)
    VALID_VARIANTS[variant](root)
    report = validate_dataset(root, CONFIG)
    assert report.success, report.summary_lines()


def test_zip_of_valid_dataset_passes(base: Path, tmp_path: Path) -> None:
    archive = tmp_path / "competition.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(base.rglob("*")):
            if path.is_file():
                zf.write(path, f"data/{path.relative_to(base).as_posix()}")  # nested once, as on Kaggle
    report = validate_dataset(archive, CONFIG)
    assert report.success, report.summary_lines()
    assert report.statistics["images_checked"] == 9


def test_label_cells_are_sets_of_single_digits(tmp_path: Path) -> None:
    cells = {"1": "6 4", "2": "1 1", "3": "10", "4": "-1", "5": "a", "6": "1  2", "7": "", "8": "0 9 5"}
    root = write_base(tmp_path / "ds", labels=cells, test_ids=[])
    report = validate_dataset(root, CONFIG)
    rows = {(f["expectation"], f["column"]): [e["row"] for e in f["examples"]] for f in report.failures}
    assert rows == {
        ("expect_column_values_to_be_in_set", "label_ids_distinct"): [3],
        ("expect_column_values_to_match_regex", "Label"): [4, 5, 6, 7],
        ("expect_column_values_to_not_be_null", "Label"): [8],
    }


def test_missing_train_csv_is_a_failed_expectation(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(base, root)
    (root / "train.csv").unlink()
    report = validate_dataset(root, CONFIG)
    assert failure_names(report) == [("files", "expect_column_values_to_be_in_set", "present")]


def test_unlisted_files_are_reported_as_warnings(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    shutil.copytree(base, root)
    shutil.copy(root / "train" / "101.png", root / "train" / "999.png")
    report = validate_dataset(root, CONFIG)
    assert report.success
    (warning,) = [w for w in report.warnings if w["column"] == "listed"]
    assert warning["examples"] == [{"Image": "999", "file": "train/999.png", "value": False}]


def test_not_a_dataset_raises_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope: dataset not found \(expected a folder or the competition .zip\)"):
        validate_dataset(tmp_path / "nope", CONFIG)
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(DataError, match="file.txt: not a folder or a zip file"):
        validate_dataset(tmp_path / "file.txt", CONFIG)


# ---- the real labels table and the distribution ------------------------------------------------


def real_label_sets() -> list[tuple[str, frozenset[int]]]:
    lines = REAL_TRAIN_CSV.read_text().splitlines()[1:]
    return [(row.split(",")[0], parse_label_set(row.split(",")[1])) for row in lines]


def test_real_train_csv_passes_the_labels_suite(tmp_path: Path) -> None:
    root = tmp_path / "real"
    root.mkdir()
    shutil.copy(REAL_TRAIN_CSV, root / "train.csv")
    report = validate_dataset(root, ValidationConfig())
    assert report.statistics["train_rows"] == 19_236
    assert [f for f in report.failures if f["suite"] in ("labels", "distribution")] == []
    # Without the images every listed file is missing, and that is the only failure.
    assert failure_names(report) == [("files", "expect_column_values_to_be_in_set", "exists")]
    assert report.failures[0]["unexpected_count"] == 19_236
    # The embedded reference is the real file's own profile.
    assert report.profile["n"] == REFERENCE_PROFILE["n"]
    assert report.profile["class_share"] == pytest.approx(REFERENCE_PROFILE["class_share"], abs=1e-6)
    assert report.profile["labels_per_image_share"] == pytest.approx(REFERENCE_PROFILE["labels_per_image_share"])


def test_profile_labels() -> None:
    profile = profile_labels([frozenset({0}), frozenset({0, 4}), frozenset({1, 2, 3, 4})])
    assert profile["n"] == 3
    assert profile["class_share"][0] == pytest.approx(2 / 3) and profile["class_share"][9] == 0.0
    assert profile["labels_per_image_share"] == pytest.approx({"1": 1 / 3, "2": 1 / 3, "3": 0.0, "4+": 1 / 3})


DRIFT_ROWS = 400
DRIFT_CLASS = 7  # Plasma membrane, ~14% of images


@pytest.fixture(scope="module")
def drift_sets() -> tuple[list[tuple[str, frozenset[int]]], list[tuple[str, frozenset[int]]]]:
    """The first 400 real rows, and the same rows with class 7's frequency doubled by turning
    'Nucleoplasm only' images into 'Plasma membrane only' (labels per image unchanged)."""
    base = real_label_sets()[:DRIFT_ROWS]
    target = sum(DRIFT_CLASS in s for _, s in base)
    donors = [i for i, (_, s) in enumerate(base) if s == frozenset({4})][:target]
    assert len(donors) == target
    drifted = list(base)
    for i in donors:
        drifted[i] = (base[i][0], frozenset({DRIFT_CLASS}))
    return base, drifted


def write_linked(root: Path, rows: list[tuple[str, frozenset[int]]], template: Path) -> Path:
    """A dataset whose images are hard links of one valid PNG: hundreds of files in milliseconds."""
    (root / "train").mkdir(parents=True)
    text = "Image,Label\n" + "".join(f"{i},{' '.join(map(str, sorted(s)))}\n" for i, s in rows)
    (root / "train.csv").write_text(text)
    for image_id, _ in rows:
        (root / "train" / f"{image_id}.png").hardlink_to(template)
    return root


def test_drift_fails_naming_the_class(base: Path, tmp_path: Path, drift_sets) -> None:
    base_rows, drifted_rows = drift_sets
    reference = profile_labels([s for _, s in base_rows])
    template = base / "train" / "101.png"
    same = validate_dataset(write_linked(tmp_path / "same", base_rows, template), CONFIG, reference)
    assert same.success, same.summary_lines()

    drifted = write_linked(tmp_path / "drifted", drifted_rows, template)
    report = validate_dataset(drifted, CONFIG, reference)
    assert failure_names(report) == [("distribution", "expect_label_shares_within_reference_bounds", "Label")]
    moved = {e["class"]: e for e in report.failures[0]["examples"] if "class" in e}
    assert DRIFT_CLASS in moved
    share = reference["class_share"][DRIFT_CLASS]
    assert moved[DRIFT_CLASS]["observed"] == pytest.approx(2 * share, abs=1e-6)
    assert moved[DRIFT_CLASS]["p_adjusted"] < 0.05
    assert "class 7 Plasma membrane" in report.summary_lines()[0]

    warned = validate_dataset(drifted, ValidationConfig(image_size=SIZE, drift_action="warn"), reference)
    assert warned.success
    assert ("distribution", "Label") in [(w["suite"], w["column"]) for w in warned.warnings]


# ---- reports, Data Docs and the store ----------------------------------------------------------


def test_run_validation_keeps_one_docs_site_with_history_and_never_moves_the_reference(
        base: Path, tmp_path: Path) -> None:
    from protein.storage import open_store

    store_uri = str(tmp_path / "store")
    store = open_store(store_uri)
    report = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report")
    assert report.success
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["data_fingerprint"] == report.data_fingerprint and saved["success"] is True
    # The exact rules that admitted the data are kept with it.
    # One suite per asset, each run by its own Validation Definition in the one Checkpoint.
    assert set(saved["suites"]) >= {"labels.rows", "files.train", "images", "integrity", "drift"}
    assert any(e["type"] == "expect_png_to_decode" for e in saved["suites"]["images"]["expectations"])
    assert saved["reference"]["source"].startswith("real train.csv") and len(saved["reference"]["hash"]) == 16
    assert Path(report.docs_path).is_file() and report.docs_path.endswith("docs/index.html")
    assert json.loads(store.get_bytes(f"validation/{report.data_fingerprint}/report.json"))["success"] is True
    assert report.docs_uri == (tmp_path / "store" / "validation" / "docs" / "index.html").as_uri()
    # A passing run does not become the reference: only a promotion or --accept moves it.
    assert not store.exists("validation/reference_profile.json")

    broken = make_faulty(base, tmp_path / "broken", next(f for f in FAULTS if f.name == "grayscale"))
    failed = run_validation(broken, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report2")
    assert not failed.success
    index = store.get_bytes("validation/docs/index.html").decode()
    pages = [k for k in store.list("validation/docs/validations/") if k.endswith(".html")]
    # One site, both runs: each run id (the data fingerprint) has its pages, linked from the index.
    for run in (report, failed):
        assert any(f"/{run.data_fingerprint}/" in k for k in pages), pages
        assert run.data_fingerprint in index
    html = "".join(store.get_bytes(k).decode() for k in pages)
    assert "PNG integrity" in html  # the custom expectation renders its own description

    accepted = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report3", accept=True)
    reference = json.loads(store.get_bytes("validation/reference_profile.json"))
    assert reference["data_fingerprint"] == accepted.data_fingerprint
    assert accepted.reference["accepted"]["hash"] == reference["hash"]
    # A failing dataset is never accepted.
    run_validation(broken, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report4", accept=True)
    assert json.loads(store.get_bytes("validation/reference_profile.json"))["hash"] == reference["hash"]


@pytest.mark.parametrize("damage,needle", [(lambda b: b + b"garbage", "data after the IEND chunk"),
                                           (lambda b: b[: len(b) // 2], "does not end with an IEND chunk: truncated")])
def test_trailing_garbage_and_truncation_are_told_apart(base: Path, tmp_path: Path, damage, needle) -> None:
    dataset = tmp_path / "ds"
    shutil.copytree(base, dataset)
    png = sorted((dataset / "train").iterdir())[0]
    png.write_bytes(damage(png.read_bytes()))
    report = validate_dataset(dataset, CONFIG)
    assert failure_names(report) == [("images", "expect_png_to_decode", "decodes")]
    assert needle in report.summary_lines()[0] and png.name in report.summary_lines()[0]


# ---- validation and the training decoder agree; duplicates and blank images ---------------------


def _png(mode: str, **save) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(3)
    channels = {"RGB": 3, "RGBA": 4, "P": 3}.get(mode)
    pixels = rng.integers(0, 255, (SIZE, SIZE, channels) if channels else (SIZE, SIZE), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB" if mode == "P" else mode)
    if mode == "P":
        image = image.convert("P")
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def _png_variants() -> dict[str, bytes]:
    from tests.data.corpus import png_16bit_rgb

    return {"sixteen_bit_rgb": png_16bit_rgb(SIZE), "palette": _png("P"), "rgba": _png("RGBA"),
            "grayscale": _png("L"), "interlaced_rgb": _interlaced()}


def _interlaced() -> bytes:
    """An Adam7-interlaced 8-bit RGB PNG (PIL writes none): rows of each pass, filter byte 0."""
    import struct
    import zlib

    import numpy as np

    pixels = np.random.default_rng(5).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    raw = b""
    for y0, x0, dy, dx in ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2),
                           (1, 0, 2, 1)):
        sub = pixels[y0::dy, x0::dx]
        for row in sub:
            raw += b"\x00" + row.tobytes()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", SIZE, SIZE, 8, 2, 0, 0, 1))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("variant", ["sixteen_bit_rgb", "palette", "rgba", "grayscale", "interlaced_rgb"])
def test_validation_and_the_training_decoder_give_the_same_verdict(base: Path, tmp_path: Path, variant: str) -> None:
    from protein.data import decode_png

    data = _png_variants()[variant]
    try:
        decode_png(data, "x")
        decodes = True
    except DataError:
        decodes = False
    root = tmp_path / variant
    shutil.copytree(base, root)
    (root / "train" / "103.png").write_bytes(data)
    report = validate_dataset(root, CONFIG)
    assert report.success == decodes, (variant, report.summary_lines())
    assert decodes == (variant == "interlaced_rgb")  # only 8-bit RGB is a training image, interlaced or not


def test_duplicates_in_train_warn_naming_the_group_and_blank_images_are_flagged(base: Path, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    root = tmp_path / "ds"
    shutil.copytree(base, root)
    shutil.copy(root / "train" / "101.png", root / "train" / "105.png")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8), "RGB").save(root / "train" / "106.png")
    report = validate_dataset(root, CONFIG)
    assert report.success, report.summary_lines()
    found = {(w["suite"], w["column"]): w for w in report.warnings}
    duplicate = found[("integrity", "duplicate_of")]
    assert duplicate["examples"] == [{"row": 6, "Image": "105", "file": "train/105.png", "split": "train",
                                      "value": "train/101.png"}]
    assert "'train/105.png' row 6 = 'train/101.png'" in " ".join(report.warning_lines())
    blank = found[("integrity", "constant")]
    assert [e["file"] for e in blank["examples"]] == ["train/106.png"]


def test_the_data_docs_history_travels_once_per_host(base: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run fetches only the history this host lacks; another host fetches it all once, and the
    index on both lists every run."""
    from protein.storage.local import LocalStore

    fetched: list[str] = []
    real_get = LocalStore.get_bytes

    def counting_get(self, key, *args, **kwargs):
        if key.startswith(("validation/results/", "validation/docs/validations/")):
            fetched.append(key)
        return real_get(self, key, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "get_bytes", counting_get)
    store_uri = str(tmp_path / "store")
    broken = make_faulty(base, tmp_path / "broken", next(f for f in FAULTS if f.name == "grayscale"))
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "host-a"))
    first = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "r1")
    second = run_validation(broken, CONFIG, store_uri=store_uri, report_dir=tmp_path / "r2")
    assert fetched == [], "host A wrote every file of the history itself: nothing to fetch"

    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "host-b"))
    third = run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "r3")
    history = {k for k in open_store_keys(store_uri)
               if k.startswith(("validation/results/", "validation/docs/validations/"))}
    assert fetched and len(fetched) == len(set(fetched)), "host B fetched the history, each file once"
    assert set(fetched) <= history
    fetched.clear()
    fourth = run_validation(broken, CONFIG, store_uri=store_uri, report_dir=tmp_path / "r4")
    assert fetched == [], "host B's second run fetched nothing again"
    index = (tmp_path / "r4" / "docs" / "index.html").read_text()
    for run in (first, second, third, fourth):
        assert run.data_fingerprint in index


def open_store_keys(store_uri: str) -> list[str]:
    from protein.storage import open_store

    return open_store(store_uri).list("validation/")


def test_a_docs_run_keeps_only_its_results_and_site_on_disk(tmp_path: Path) -> None:
    """The GX project of a run with Data Docs lives in memory but for what outlives the run: no
    great_expectations.yml written again for every asset added (docs/validation.md, "Cost"), no
    suites, definitions or Checkpoint as files; the results and the site where the history sync
    (protein/validation/history.py) reads and writes them."""
    from protein.validation import suites
    from protein.validation.checkpoint import GX_DOCS, GX_RESULTS, run_checkpoint

    outcome = run_checkpoint([suites.required_table(True)], "run-1", tmp_path, docs=True)
    assert outcome.success
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written, "nothing written"
    outside = sorted(p for p in written if not p.startswith((f"{GX_RESULTS.as_posix()}/", f"{GX_DOCS.as_posix()}/",
                                                             "tables/")))
    assert outside == [], f"a docs run wrote project files: {outside}"
    assert f"{GX_DOCS.as_posix()}/index.html" in written
    assert any(p.startswith(f"{GX_RESULTS.as_posix()}/") and "run-1" in p for p in written)


# ---- a host fault is no verdict ------------------------------------------------------------------


def failing_open(suffix: str, code: int) -> Callable[..., Any]:
    """`open` for the image inspection, failing with `code` on the one file ending in `suffix`."""

    def opener(path: object, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith(suffix):
            raise OSError(code, os.strerror(code), str(path))
        return builtins.open(path, *args, **kwargs)  # type: ignore[call-overload]

    return opener


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO, errno.EMFILE, errno.EACCES])
def test_a_host_read_error_raises_exit_3_and_records_no_verdict(base: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """A full download cache or a failing disk on the validating host says nothing about the data:
    a stored failed report would refuse the push every night for a week (the task's cache)."""
    import protein.validation.images
    from protein.errors import StoreError
    from protein.storage import open_store

    monkeypatch.setattr(protein.validation.images, "open", failing_open("train/101.png", code), raising=False)
    store_uri = str(tmp_path / "store")
    with pytest.raises(StoreError) as raised:
        run_validation(base, CONFIG, store_uri=store_uri, report_dir=tmp_path / "report")
    assert raised.value.exit_code == 3
    message = str(raised.value)
    assert "train/101.png" in message and os.strerror(code) in message and errno.errorcode[code] in message
    assert "\n" not in message
    assert not (tmp_path / "report" / "report.json").exists()
    assert not [k for k in open_store(store_uri).list("validation/") if k.endswith("report.json")]
    # Raised inside a pool worker, it must reach the parent as itself.
    crossed = pickle.loads(pickle.dumps(raised.value))
    assert type(crossed) is StoreError and str(crossed) == message


def test_an_image_gone_during_the_run_is_no_verdict_either(base: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # A missing image is judged from the listing; one listed and fingerprinted, then gone, was removed mid-run.
    import protein.validation.images

    monkeypatch.setattr(protein.validation.images, "open", failing_open("train/101.png", errno.ENOENT), raising=False)
    with pytest.raises(DataError, match="train/101.png: vanished while validating") as raised:
        run_validation(base, CONFIG, report_dir=tmp_path / "report")
    assert raised.value.exit_code == 2 and not (tmp_path / "report" / "report.json").exists()


def test_an_image_the_data_breaks_is_still_unreadable_and_fails(base: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A folder where an image goes (EISDIR) and a corrupt PNG are the data's own faults: a verdict, exit 1.
    import protein.validation.images

    root = make_faulty(base, tmp_path / "ds", next(f for f in FAULTS if f.name == "corrupt_pixels"))
    monkeypatch.setattr(protein.validation.images, "open", failing_open("train/104.png", errno.EISDIR), raising=False)
    report = validate_dataset(root, CONFIG)
    assert not report.success
    records = {(f["column"], e.get("file"), e.get("value")) for f in report.failures for e in f["examples"]}
    # Unreadable: no size, so "every listed image must be readable" (bytes not null) fails on it.
    assert ("bytes", "train/104.png", None) in records, report.summary_lines()
    assert ("decodes", "train/101.png", False) in records, report.summary_lines()
