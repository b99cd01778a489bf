"""Where the competition files sit (flat, Kaggle's 'Human protein atlas/' download, zips) and the
content-based fingerprint: same bytes -> same fingerprint, any change -> another."""

import os
import shutil
import zipfile

import pytest

from protein.data import fingerprint, load_competition, open_dataset, resolve_layout
from protein.errors import DataError
from tests.helpers import write_dataset, write_kaggle_dataset, write_png, zip_folder

LABELS = {"1": "0", "2": "6 4", "3": "9", "4": "1"}
TEST_IDS = ["12", "10", "11"]  # the template's order, not sorted


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def flat(tmp_path):
    return write_dataset(tmp_path / "flat", LABELS, TEST_IDS)


@pytest.fixture
def kaggle(tmp_path):
    return write_kaggle_dataset(tmp_path / "jovian-pytorch-z2g", LABELS, TEST_IDS)


def fp(path):
    return fingerprint(open_dataset(path))


def layout_of(files):
    names = set(files)

    def subdirs(folder):
        return sorted({n[len(folder):].split("/")[0] for n in names if n.startswith(folder) and "/" in n[len(folder):]})

    return resolve_layout(lambda rel: rel in names, subdirs, "here", strict=True)


def test_layouts_resolve_root_and_template():
    flat = layout_of(["train.csv", "sample_submission.csv", "train/1.png"])
    assert (flat.root, flat.template) == ("", "sample_submission.csv")
    kaggle = layout_of(["Human protein atlas/train.csv", "Human protein atlas/train/1.png", "submission.csv"])
    assert (kaggle.root, kaggle.template) == ("Human protein atlas/", "submission.csv")
    # A zip of the downloaded folder nests once more; the template is still one level above train.csv.
    nested = layout_of(["z2g/Human protein atlas/train.csv", "z2g/submission.csv", "submission.csv"])
    assert (nested.root, nested.template) == ("z2g/Human protein atlas/", "z2g/submission.csv")
    # sample_submission.csv beside train.csv wins over a submission.csv above.
    both = layout_of(["a/train.csv", "a/sample_submission.csv", "submission.csv"])
    assert both.template == "a/sample_submission.csv"
    assert layout_of(["a/train.csv"]).template is None


def test_layout_errors_name_what_was_expected():
    with pytest.raises(DataError, match=r"^here: not the competition layout: expected train.csv .*Human protein atlas"):
        layout_of(["images/1.png", "labels.csv"])
    with pytest.raises(DataError, match=r"train.csv found in several folders \('a/', 'b/'\)"):
        layout_of(["a/train.csv", "b/train.csv"])


@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_kaggle_download_loads_with_template_above(kaggle, tmp_path, as_zip):
    path = zip_folder(kaggle, tmp_path / "jovian-pytorch-z2g.zip") if as_zip else kaggle
    data = load_competition(path)
    assert data.train_ids == list(LABELS) and data.test_ids == TEST_IDS
    where = data.source.locate("sample_submission.csv")
    assert where.endswith("submission.csv") and "Human protein atlas" not in where
    assert data.source.locate("train/1.png").endswith("Human protein atlas/train/1.png")
    assert len(data.source.read_bytes("test/12.png")) > 0


def test_missing_template_says_where_it_is_expected(kaggle):
    (kaggle / "submission.csv").unlink()
    with pytest.raises(DataError, match=r"no submission template .*sample_submission.csv beside train.csv, "
                                        r"or submission.csv one level above"):
        load_competition(kaggle)
    assert load_competition(kaggle, require_test=False).test_ids == []


def test_same_bytes_same_fingerprint_across_layouts_copies_and_zips(flat, kaggle, tmp_path):
    reference = fp(flat)
    assert fp(kaggle) == reference  # layout does not matter, content does
    copy = shutil.copytree(flat, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes, inodes
    os.utime(copy / "train" / "1.png", (1, 1))
    assert fp(copy) == reference
    assert fp(zip_folder(flat, tmp_path / "flat.zip")) == reference
    kaggle_zip = zip_folder(kaggle, tmp_path / "kaggle.zip")
    assert fp(kaggle_zip) == reference
    unzipped = tmp_path / "unzipped"
    with zipfile.ZipFile(kaggle_zip) as zf:
        zf.extractall(unzipped)
    assert fp(unzipped) == reference
    # Nothing in the hash cache changes the answer: a fresh cache gives the same fingerprint.
    os.environ["PROTEIN_CACHE_DIR"] = str(tmp_path / "other-cache")
    assert fp(flat) == reference


@pytest.mark.parametrize("change", ["rewrite", "rename", "add", "remove", "template", "labels"])
def test_any_change_changes_the_fingerprint(flat, change):
    before = fp(flat)
    image = flat / "train" / "2.png"
    if change == "rewrite":
        write_png(image, seed=99)
    elif change == "rename":
        image.rename(flat / "train" / "22.png")
    elif change == "add":
        write_png(flat / "test" / "13.png", seed=5)
    elif change == "remove":
        image.unlink()
    elif change == "template":
        (flat / "sample_submission.csv").write_text("Image,Label\n10,0\n11,0\n12,0\n")  # another order
    else:
        (flat / "train.csv").write_text("Image,Label\n1,0\n2,6\n3,9\n4,1\n")
    assert fp(flat) != before


def test_hash_cache_is_not_fooled_by_a_restored_mtime(flat):
    before = fp(flat)  # fills the hash cache
    image = flat / "train" / "3.png"
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size, other content
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `touch -r` or a careless tool would
    assert image.stat().st_mtime_ns == st.st_mtime_ns and image.stat().st_size == st.st_size
    assert fp(flat) != before


def test_symlink_outside_the_dataset_is_never_read(flat, tmp_path):
    outside = tmp_path / "outside.png"
    write_png(outside)
    (flat / "train" / "1.png").unlink()
    (flat / "train" / "1.png").symlink_to(outside)
    # The fingerprint names the link by where it points, without reading it (so validation can
    # still report it beside other bad files): the outside file's bytes do not enter it.
    before = fp(flat)
    write_png(outside, seed=99)
    assert fp(flat) == before
    with pytest.raises(DataError, match="points outside the dataset folder"):
        open_dataset(flat).read_bytes("train/1.png")
