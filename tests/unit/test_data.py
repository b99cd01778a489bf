import io
import re
import zipfile

import numpy as np
import pytest
from PIL import Image

from protein.data import decode_png, fingerprint, load_competition, load_image, open_dataset
from protein.errors import DataError
from tests.helpers import REAL, write_dataset, write_png

# Real label statistics from shared/data/README.md.
REAL_CLASS_COUNTS = [2088, 1752, 2542, 1977, 9066, 1109, 5711, 2629, 1037, 1278]
REAL_LABELS_PER_IMAGE = {1: 10639, 2: 7299, 3: 1240, 4: 58}


def test_real_train_csv_loads_with_readme_statistics():
    data = load_competition(REAL)
    assert len(data.train_ids) == 19236
    assert len(data.test_ids) == 8243
    targets = data.targets
    assert targets.sum(0).astype(int).tolist() == REAL_CLASS_COUNTS
    per_image = np.bincount(targets.sum(1).astype(int))
    assert {k: int(per_image[k]) for k in REAL_LABELS_PER_IMAGE} == REAL_LABELS_PER_IMAGE
    # Label order is free in the file ("6 4"), canonical in our frame.
    assert data.labels_frame().loc[1, "Label"] == "4 6"
    assert data.test_ids[:2] == ["24117", "15322"]


def test_real_test_image_decodes_as_rgb():
    data = load_competition(REAL)
    pixels = load_image(data.source.read_bytes("test/10034.png"), "10034.png", 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8


@pytest.fixture
def tiny(tmp_path):
    return write_dataset(tmp_path / "ds", {"1": "0", "2": "6 4", "3": "9"}, ["10", "11"])


def test_folder_and_zip_read_the_same(tiny, tmp_path):
    archive = tmp_path / "competition.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tiny.rglob("*")):
            if path.is_file():
                zf.write(path, f"nested/{path.relative_to(tiny)}")  # the Kaggle zip nests one folder down
    folder, zipped = load_competition(tiny), load_competition(archive)
    assert folder.train_ids == zipped.train_ids == ["1", "2", "3"]
    assert folder.test_ids == zipped.test_ids
    assert folder.source.read_bytes("train/2.png") == zipped.source.read_bytes("train/2.png")
    assert zipped.source.list_dir("test") == ["10.png", "11.png"]


def test_an_unreadable_zip_is_named_with_its_os_error_not_called_no_zip(tiny, tmp_path, monkeypatch):
    """zipfile.is_zipfile answers False for a file it cannot open, so `--data` on a zip without read
    permission said "not a folder or a zip file". Tests run as root, which reads any file: open is
    made to refuse it, wherever it is called from."""
    import builtins

    import protein.data.opening

    archive = tmp_path / "competition.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tiny / "train.csv", "train.csv")
    plain_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file) == str(archive):
            raise PermissionError(13, "Permission denied", str(file))
        return plain_open(file, *args, **kwargs)

    monkeypatch.setattr(protein.data.opening, "open", refusing_open, raising=False)
    monkeypatch.setattr(zipfile, "open", refusing_open, raising=False)
    with pytest.raises(DataError) as raised:
        open_dataset(archive)
    assert str(raised.value) == f"{archive}: Permission denied"


def test_nested_folder_is_found(tiny, tmp_path):
    outer = tmp_path / "outer"
    outer.mkdir()
    tiny.rename(outer / "inner")
    assert load_competition(outer).train_ids == ["1", "2", "3"]


def test_bom_and_crlf_are_accepted(tiny):
    (tiny / "train.csv").write_bytes(b"\xef\xbb\xbfImage,Label\r\n1,0\r\n2,6 4\r\n3,9\r\n")
    assert load_competition(tiny).train_label_sets[1] == frozenset({4, 6})


@pytest.mark.parametrize("content,needle", [
    ("Image\n1\n", "missing column(s) Label"),
    ("Image,Label\n1,0\n2,12\n", "line 3 (Image '2'): expected class ids 0-9, got 12"),
    ("Image,Label\n1,0\n1,2\n", "line 3: image id '1' repeats line 2"),
    ("Image,Label\n../x,0\n", "line 2: image id '../x' is not a safe id"),
    ("Image,Label\n1,x\n", "expected integer class ids"),
    ("Image,Label\n", "no data rows"),
    ("Image,Label\n1,0\n2,4,5\n", "line 3: 3 fields, expected 2"),
    ("", "empty file"),
    ("\nImage,Label\n1,0\n", "train.csv line 1: blank; expected the header Image,Label"),
    ("  \nImage,Label\n1,0\n", "train.csv line 1: blank; expected the header Image,Label"),
    # Lines as an editor numbers them: blank lines and a quoted field over two lines count.
    ("Image,Label\n1,0\n\n\n../x,0\n", "line 5: image id '../x' is not a safe id"),
    ("Image,Label\n1,0\n2,\"4\n6\"\n1,2\n", "line 3 (Image '2'): expected integer class ids"),
    ("Image,Label\n1,0\n\n1,2\n", "line 4: image id '1' repeats line 2"),
    # An unclosed quote swallows the rest of the file: csv.Error, a traceback with exit 1, before.
    ("Image,Label\n1,0\n2,\"2 3\n" + "5,1\n" * 40000, "line 3: not a CSV row (field larger than field limit"),
])
def test_bad_train_csv_names_the_row(tiny, content, needle):
    (tiny / "train.csv").write_text(content)
    with pytest.raises(DataError, match=None) as info:
        load_competition(tiny)
    assert needle in str(info.value)
    assert "train.csv" in str(info.value)


def test_a_repeated_test_id_in_the_template_names_both_lines(tiny):
    # Every id of the template is predicted and published: a repeat would be a submission row twice.
    (tiny / "sample_submission.csv").write_text("Image,Label\n9,0\n\n9,0\n")
    with pytest.raises(DataError, match=r"sample_submission\.csv line 4: image id '9' repeats line 2"):
        load_competition(tiny)


def test_an_unclosed_quote_is_one_line_and_exit_2_from_the_cli(tiny, tmp_path, capsys):
    from protein.cli import main

    (tiny / "train.csv").write_text("Image,Label\n1,\"0\n" + "2,1\n" * 40000)
    assert main(["datasets", "push", "--data", str(tiny), "--store", str(tmp_path / "store")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.csv line 2: not a CSV row" in err, err
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.json"))


def test_missing_train_csv(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train.csv: file not found"):
        load_competition(tmp_path / "empty")


def test_missing_dataset(tmp_path):
    with pytest.raises(DataError, match="dataset not found"):
        open_dataset(tmp_path / "nope")


def test_zip_slip_names_are_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("train.csv", "Image,Label\n1,0\n")
        zf.writestr("../evil.png", b"x")
    with pytest.raises(DataError, match="unsafe member name"):
        load_competition(archive, require_test=False)


def test_symlink_outside_dataset_is_refused(tiny, tmp_path):
    outside = tmp_path / "secret.png"
    write_png(outside)
    (tiny / "train" / "1.png").unlink()
    (tiny / "train" / "1.png").symlink_to(outside)
    with pytest.raises(DataError, match="outside the dataset folder"):
        load_competition(tiny).source.read_bytes("train/1.png")


def png_bytes(mode: str, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data,needle", [
    (b"", "empty file"),
    (b"not an image at all", "not an image"),
    (png_bytes("L"), "mode L (expected an 8-bit RGB PNG)"),
    (png_bytes("RGB", 64)[:-40], "truncated or corrupt"),
])
def test_bad_images_are_named(data, needle):
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        decode_png(data, "train/7.png")
    assert "train/7.png" in str(info.value) and needle in str(info.value)


def test_jpeg_is_refused():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    with pytest.raises(DataError, match="JPEG image"):
        decode_png(buffer.getvalue(), "x")


def test_decompression_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")  # small file, huge canvas
    with pytest.raises(DataError, match="decompression-bomb"):
        decode_png(buffer.getvalue(), "bomb.png")


def test_fingerprint_changes_with_any_image(tiny):
    before = fingerprint(open_dataset(tiny))
    assert fingerprint(open_dataset(tiny)) == before
    write_png(tiny / "test" / "10.png", seed=99)
    assert fingerprint(open_dataset(tiny)) != before
