"""Honest fast modes and error paths of `protein validate`: one line, a documented exit code,
nothing half-written, the reference moved only after the report is stored."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from protein.cli import main
from protein.data import fingerprint, open_dataset
from protein.validation.config import PIXEL_CHECKS
from tests.data.corpus import SIZE, write_base

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base(tmp_path_factory.mktemp("corpus") / "base")


def validate(*args: str) -> int:
    return main(["validate", "--image-size", str(SIZE), "--max-image-bytes", "200000", *args])


def test_headers_only_says_what_it_did_not_check(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = validate("--data", str(base), "--headers-only", "--report", str(tmp_path / "r"),
                    "--store", str(tmp_path / "store"))
    out, err = capsys.readouterr()
    assert code == 0
    emitted = json.loads(out.strip().splitlines()[-1])
    assert emitted["skipped_checks"] == list(PIXEL_CHECKS)
    assert all(f"not checked: {check}" in err for check in PIXEL_CHECKS)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["skipped"] == list(PIXEL_CHECKS)
    # The skipped checks are not in the suites either: nothing passes vacuously.
    types = {e["type"] for e in report["suites"]["integrity"]["expectations"]}
    assert types == {"expect_column_values_to_be_null"}


def test_a_report_folder_named_relative_to_the_working_folder(base: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """`--report reports/today`, as a user types it: the report lands there (Great Expectations
    refuses a relative project folder; it once made every such run exit 2)."""
    monkeypatch.chdir(tmp_path)
    assert validate("--data", str(base), "--headers-only", "--report", "reports/today") == 0
    assert sorted(p.name for p in (tmp_path / "reports" / "today").iterdir()) == ["docs", "report.json"]


def test_a_headers_only_run_keeps_the_pixel_profile_an_earlier_run_stored(base: Path, tmp_path: Path) -> None:
    """A headers-only trial run on the store replaced the report a promotion builds its drift reference
    from, without the row hashes and image statistics: new-rows and image drift went quiet."""
    from protein.storage import open_store
    from protein.validation.drift import PIXEL_PROFILE_KEYS
    from protein.validation.reference import report_key

    store = str(tmp_path / "store")
    assert validate("--data", str(base), "--store", store, "--report", str(tmp_path / "full")) == 0
    key = report_key(fingerprint(open_dataset(base)))
    full = json.loads(open_store(store).get_bytes(key))["profile"]
    assert all(full.get(k) for k in PIXEL_PROFILE_KEYS), sorted(full)
    assert validate("--data", str(base), "--store", store, "--headers-only", "--report", str(tmp_path / "h")) == 0
    after = json.loads(open_store(store).get_bytes(key))
    assert after["skipped"] == list(PIXEL_CHECKS)  # this run's own verdict, written
    assert {k: after["profile"].get(k) for k in PIXEL_PROFILE_KEYS} == {k: full[k] for k in PIXEL_PROFILE_KEYS}


def test_the_nightly_decodes_every_image() -> None:
    from flows.params import ValidationParams

    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    nightly = next(d for d in spec["deployments"] if d["name"] == "nightly")
    assert ValidationParams().check_pixels is True
    assert "check_pixels" not in json.dumps(nightly.get("parameters", {})) + json.dumps(nightly.get("schedules"))


def test_report_at_an_existing_file_is_a_usage_error(base: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "report.txt"
    target.write_text("mine")
    code = validate("--data", str(base), "--report", str(target), "--store", str(tmp_path / "store"))
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == (f"protein validate: error: --report {target}: exists and is not a folder "
                           "(report.json and docs/ go in a folder)")
    assert target.read_text() == "mine" and not (tmp_path / "store").exists()


def test_a_report_folder_keeps_what_validate_did_not_write(base: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """`--report .` in a project checkout once moved its docs/ aside and deleted it. Someone else's
    docs/ or report.json is refused; a folder an earlier validate wrote is replaced, run after run."""
    mine = tmp_path / "checkout"
    (mine / "docs").mkdir(parents=True)
    (mine / "docs" / "notes.md").write_text("mine")
    code = validate("--data", str(base), "--headers-only", "--report", str(mine))
    _, err = capsys.readouterr()
    assert code == 2
    assert err.strip() == (f"protein validate: error: --report {mine}: {mine / 'docs'} exists and was not "
                           "written by protein validate (expected a new or empty folder, or one an earlier "
                           "validate wrote)")
    assert (mine / "docs" / "notes.md").read_text() == "mine"
    assert sorted(p.name for p in mine.iterdir()) == ["docs"]

    only_report = tmp_path / "other"
    only_report.mkdir()
    (only_report / "report.json").write_text("{}")
    assert validate("--data", str(base), "--headers-only", "--report", str(only_report)) == 2
    assert (only_report / "report.json").read_text() == "{}"

    again = tmp_path / "again"
    for _ in range(2):
        assert validate("--data", str(base), "--headers-only", "--report", str(again)) == 0
        assert sorted(p.name for p in again.iterdir()) == ["docs", "report.json"]
        assert (again / "docs" / "index.html").is_file()


def test_a_store_failure_leaves_nothing_half_written_and_the_reference_unmoved(
        base: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "store"
    # The report's folder in the store is a file: uploading report.json fails (after the docs).
    blocked = store / "validation" / fingerprint(open_dataset(base))
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way")
    code = validate("--data", str(base), "--store", str(store), "--report", str(tmp_path / "r"), "--accept")
    _, err = capsys.readouterr()
    assert code == 3, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("protein validate: error:")
    assert list((tmp_path / "r").iterdir()) == []  # no docs/, no report.json, no staging folder
    assert not (store / "validation" / "reference_profile.json").exists()

    blocked.unlink()
    assert validate("--data", str(base), "--store", str(store), "--report", str(tmp_path / "r"), "--accept") == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["docs", "report.json"]
    reference = json.loads((store / "validation" / "reference_profile.json").read_text())
    stored = json.loads((blocked / "report.json").read_text())
    assert stored["reference"]["accepted"]["hash"] == reference["hash"]
    # The reference knows its rows and image statistics: the next run compares new rows and images.
    assert len(reference["row_hashes"]) == 6 and set(reference["image_statistics"]) >= {"green_mean"}


def test_data_docs_explain_a_drift_failure(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tests.data.test_custom_expectations import CENTROSOME, real_rows_without, write_rows
    from tests.helpers import write_png

    template = tmp_path / "t.png"
    write_png(template, SIZE)
    dataset = write_rows(tmp_path / "ds", real_rows_without(CENTROSOME, 400), template)
    assert validate("--data", str(dataset), "--report", str(tmp_path / "r"), "--store", str(tmp_path / "store")) == 1
    _, err = capsys.readouterr()
    assert "class 8 Centrosome: 5.4% -> 0.0%" in err
    pages = [p for p in (tmp_path / "r" / "docs" / "validations").rglob("*.html")]
    drift = [p.read_text() for p in pages if p.parts[-4] == "drift"]
    assert len(drift) == 1, [p.relative_to(tmp_path) for p in pages]
    html = drift[0]
    # The asset, the expectation's rule, and for the class that moved: reference, current, p.
    for text in ("Data asset: drift", "Label drift ( all rows )", "Shares that drifted", "Centrosome", "5.4 %",
                 "0.0 %", "adjusted p (Holm)"):
        assert text in " ".join(re.sub(r"<[^>]+>", " ", html).split()), text


@pytest.mark.parametrize(("option", "value", "named"), [
    ("--max-image-bytes", "100000000000000000000000", "max_image_bytes must be 1 to 1,073,741,824"),
    ("--max-image-bytes", "2000000000", "max_image_bytes must be 1 to 1,073,741,824"),
    ("--drift-min-relative-change", "nan", "drift_min_relative_change must be a finite number >= 0, got nan"),
    ("--drift-min-relative-change", "inf", "drift_min_relative_change must be a finite number >= 0, got inf"),
])
def test_a_validation_option_out_of_bounds_is_one_line_before_any_check(
        base: Path, tmp_path: Path, capsys: pytest.CaptureFixture, option: str, value: str, named: str) -> None:
    # The bound was read as the size of a buffer: OverflowError or MemoryError, a traceback, exit 1
    # ("data failed validation"); NaN reached GX after the other suites ran, three lines.
    assert main(["validate", "--data", str(base), "--store", str(tmp_path / "store"), option, value]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "store").exists()


def test_a_large_bound_reads_only_the_file(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The bound's upper end is accepted, and an image is read at its own size: a read of the
    bound's size asks for a 1 GiB buffer per image (per worker), which a host with a memory limit
    refuses."""
    assert main(["validate", "--data", str(base), "--store", str(tmp_path / "store"), "--image-size", str(SIZE),
                 "--max-image-bytes", str(2**30)]) == 0, capsys.readouterr().err

    from protein.data import FolderSource
    from protein.validation import images

    asked: list[int] = []

    class Recorded:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __enter__(self) -> Recorded:
            return self

        def __exit__(self, *exc: object) -> None:
            self.f.close()

        def read(self, n: int = -1) -> bytes:
            asked.append(n)
            return self.f.read(n)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    monkeypatch.setattr(images, "open", lambda path, mode: Recorded(open(path, mode)),  # noqa: SIM115 (closed by Recorded)
                        raising=False)
    [png] = sorted((base / "train").glob("*.png"))[:1]
    size, data, _ = images.ImageReader(FolderSource(base), True, 2**30)._read(f"train/{png.name}")
    assert size == png.stat().st_size == len(data)
    assert asked == [size + 1], asked


def test_data_docs_escape_what_the_csv_holds(base: Path, tmp_path: Path) -> None:
    """A pushed train.csv's ids, labels and header reached the Data Docs pages as raw HTML (GX
    autoescapes only templates named .html, and its table cells are plain strings): every operator
    opening the docs ran the file's script. The run fails as before and no page holds the markup."""
    dataset = Path(shutil.copytree(base, tmp_path / "ds"))
    script, image = "<script>alert(1)</script>", "<img src=x onerror=alert(1)>"
    (dataset / "train.csv").write_text("\n".join([
        f"Image,Label,{script}", f"{image},0,", f"{script},{script},", f"{script},{image},", "104,1 3,"]) + "\n")
    assert validate("--data", str(dataset), "--report", str(tmp_path / "r"), "--store", str(tmp_path / "store")) == 1
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # report.json is data: the values as the file holds them.
    (ids,) = [f for f in report["failures"] if f["expectation"] == "expect_column_values_to_match_regex"
              and f["column"] == "Image"]
    assert [e["Image"] for e in ids["examples"]] == [image, script, script]
    (header,) = [f for f in report["failures"] if f["table"] == "labels.train_csv"]
    assert header["examples"][0]["value"] == f"Image,Label,{script}"
    pages = list((tmp_path / "r" / "docs").rglob("*.html")) + list((tmp_path / "store").rglob("*.html"))
    assert any(p.name == "index.html" for p in pages) and len(pages) > 2
    shown = " ".join(p.read_text() for p in pages)
    assert "&lt;img src=x onerror" in shown  # the failing values are still shown, as text
    for page in pages:
        html = page.read_text()
        assert "<script>alert(1)" not in html and "<img src=x onerror" not in html, page
