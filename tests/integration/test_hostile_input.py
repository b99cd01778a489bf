"""Hostile and broken input (image bombs, escaping names and zip members, forged model records, a
million-row train.csv) is refused with one line and a documented exit code, within bounded memory."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from protein.config import TrainConfig
from protein.registry import CHAMPION_KEY, Registry
from protein.storage import open_store
from tests.conftest import ProteinProcess
from tests.helpers import module_scratch, one_torch_thread, write_dataset, write_png
from tests.integration.reliability_common import IMAGE, ONE_THREAD, assert_one_line_error, cli

pytestmark = pytest.mark.integration


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int, pixels: bool = True) -> bytes:
    """A side x side RGB PNG of zeros: a few hundred KB that would decode to side*side*3 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + 3 * side)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush() if pixels else b"x"
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def replace_image(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda ds: (ds / "train" / name).write_bytes(data)


def symlink_outside(ds: Path) -> None:
    outside = ds.parent / "private.png"
    write_png(outside)
    (ds / "train" / "5.png").unlink()
    (ds / "train" / "5.png").symlink_to(outside)


def with_id(image_id: str) -> Callable[[Path], None]:
    def mutate(ds: Path) -> None:
        write_png(ds / "train" / "ok.png")
        quoted = '"' + image_id.replace('"', '""') + '"'
        (ds / "train.csv").write_text(f"Image,Label\nok,0\n{quoted},1\n", encoding="utf-8")

    return mutate


def valid_png_bytes() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (IMAGE, IMAGE), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


HOSTILE_TRAIN_INPUT = {
    "png-10000x10000": (replace_image("5.png", bomb_png(10_000)), "train/5.png: 10000x10000 pixels exceeds "
                        "the 16,777,216-pixel limit (decompression-bomb guard)"),
    "png-20000x20000": (replace_image("5.png", bomb_png(20_000, pixels=False)),
                        "train/5.png: 20000x20000 pixels exceeds the 16,777,216-pixel limit"),
    "png-trailing-garbage": (replace_image("5.png", valid_png_bytes() + b"<?php system($_GET['c']); ?>"),
                             "train/5.png: 28 bytes of trailing data after the IEND chunk"),
    "png-glued-to-a-zip": (replace_image("5.png", valid_png_bytes() + b"PK\x03\x04" + b"\0" * 60),
                           "train/5.png: 64 bytes of trailing data after the IEND chunk"),
    "symlink-outside": (symlink_outside, "train/5.png: points outside the dataset folder"),
    "id-unicode": (with_id("é1"), "image id 'é1' is not a safe id"),
    "id-shell-substitution": (with_id("$(touch PWNED)"), "image id '$(touch PWNED)' is not a safe id"),
    "id-backticks-and-semicolon": (with_id("`touch PWNED`;rm -rf ~"), "is not a safe id"),
    "id-path": (with_id("../../etc/passwd"), "image id '../../etc/passwd' is not a safe id"),
    "id-bidi-override": (with_id("12\u202e3"), "is not a safe id"),
    "id-fullwidth-digits": (with_id("\uff11\uff12"), "is not a safe id"),
}


@pytest.mark.parametrize("case", HOSTILE_TRAIN_INPUT)
def test_hostile_dataset_is_refused_with_one_line_and_exit_2(case, tmp_path, monkeypatch):
    mutate, needle = HOSTILE_TRAIN_INPUT[case]
    dataset = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["900"], size=IMAGE)
    mutate(dataset)
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    result = cli("train", "--data", str(dataset), "--store", str(store), "--cache-dir", str(tmp_path / "cache"),
                 "--epochs", "1", "--image-size", str(IMAGE))
    assert_one_line_error(result, 2, needle)
    assert len(result.stderr.splitlines()) == 1  # no warning either (PIL warns about big images)
    assert not (store / "models").exists() and not (store / "runs").exists()
    assert not list(tmp_path.rglob("PWNED"))
    assert not list(tmp_path.glob("cache/*.npy"))


def test_hostile_images_fail_validation_naming_each_file(tmp_path):
    dataset = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["900"], size=IMAGE)
    symlink_outside(dataset)  # train/5.png
    (dataset / "train" / "6.png").write_bytes(bomb_png(10_000))
    (dataset / "train" / "7.png").write_bytes(valid_png_bytes() + b"trailing")
    result = cli("validate", "--data", str(dataset), "--store", str(tmp_path / "store"),
                 "--image-size", str(IMAGE))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert json.loads(result.stdout)["success"] is False
    for needle in ("'train/5.png' row 7 (cannot read: points outside the dataset folder",
                   "'train/6.png' row 8 = '10000x10000'",
                   "'train/7.png' row 9 = False (data after the IEND chunk (trailing garbage))"):
        assert needle in result.stderr, result.stderr
    assert not (tmp_path / "store" / "models").exists()


def zip_with(member: str) -> Callable[[Path], Path]:
    def build(tmp: Path) -> Path:
        archive = tmp / "competition.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("train.csv", "Image,Label\n1,0\n")
            zf.writestr("train/1.png", valid_png_bytes())
            zf.writestr(member, b"evil")
        return archive

    return build


@pytest.mark.parametrize("member", ["../evil.png", "train/../../evil.png", "/etc/cron.d/evil", "C:/evil.png",
                                    "train\\..\\..\\evil.png"])
def test_zip_with_escaping_member_names_is_refused(member, tmp_path):
    archive = zip_with(member)(tmp_path)
    for verb in ("train", "validate"):
        result = cli(verb, "--data", str(archive), "--store", str(tmp_path / "store"),
                     *(["--cache-dir", str(tmp_path / "cache")] if verb == "train" else []))
        assert_one_line_error(result, 2, f"unsafe member name {member!r}")
    assert not (tmp_path / "store").exists() and not (tmp_path.parent / "evil.png").exists()


@pytest.fixture(scope="module")
def served_store(tmp_path_factory: pytest.TempPathFactory, small_dataset: Path,
                 trainer: Callable[..., dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A store with a promoted champion, for the prediction side."""
    with module_scratch(tmp_path_factory, "served") as root:
        with one_torch_thread():
            result = trainer(small_dataset, str(root / "store"), TrainConfig(
                image_size=IMAGE, epochs=1, batch_size=8), run_id="served", cache_dir=root / "cache")
        Registry(open_store(str(root / "store"))).promote(result["model_id"], expected_champion=None)
        yield {"store": str(root / "store"), "model_id": result["model_id"], "cache": root / "cache"}


def test_model_json_claiming_another_architecture_is_refused_by_predict(served_store, small_dataset, tmp_path):
    store = open_store(served_store["store"])
    registry = Registry(store)
    local = registry.download(served_store["model_id"], tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    # Registered through the normal path, so every checksum is right: only the claim is false.
    liar = registry.register(local / "model.safetensors", {**{k: spec[k] for k in (
        "image_size", "normalization", "class_names", "thresholds", "metrics")}, "arch": "resnet34"},
        version="liar-resnet34")
    pointer = store.get_bytes(CHAMPION_KEY)
    for verb in ("predict", "evaluate"):
        result = cli(verb, "--data", str(small_dataset), "--store", store.uri, "--cache-dir", str(tmp_path / "c"),
                     "--model", liar)
        assert_one_line_error(result, 4, f"{liar}: weights do not match architecture 'resnet34'")
    assert store.get_bytes(CHAMPION_KEY) == pointer
    assert not store.list(f"submissions/{liar}/")


@pytest.mark.parametrize("case", ["png-trailing-garbage", "id-shell-substitution"])
def test_hostile_test_set_is_refused_by_predict(case, served_store, small_dataset, tmp_path):
    dataset = tmp_path / "ds"
    import shutil

    shutil.copytree(small_dataset, dataset)
    if case == "png-trailing-garbage":
        (dataset / "test" / "901.png").write_bytes(valid_png_bytes() + b"\0" * 7)
        needle = "test/901.png: 7 bytes of trailing data after the IEND chunk"
    else:
        (dataset / "sample_submission.csv").write_text("Image,Label\n900,0\n$(touch PWNED),0\n")
        needle = "image id '$(touch PWNED)' is not a safe id"
    store = open_store(served_store["store"])
    before = store.list("submissions/")
    result = cli("predict", "--data", str(dataset), "--store", store.uri, "--cache-dir", str(tmp_path / "c"),
                 "--out", str(tmp_path / "submission.csv"))
    assert_one_line_error(result, 2, needle)
    assert store.list("submissions/") == before and not (tmp_path / "submission.csv").exists()


def test_million_row_train_csv_is_bounded_in_memory_and_time(tmp_path, protein_process: ProteinProcess):
    dataset = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(8)}, ["900"], size=IMAGE)
    with open(dataset / "train.csv", "w") as f:
        f.write("Image,Label\n")
        f.writelines(f"{i},{i % 10}\n" for i in range(1_000_000))
    command = [sys.executable, "-m", "protein.cli", "train", "--data", str(dataset), "--store",
               str(tmp_path / "store"), "--cache-dir", str(tmp_path / "cache"), "--image-size", str(IMAGE)]
    _, _, idle = run_measured(protein_process, [sys.executable, "-c", "import protein.pipeline, protein.cli"])
    started = time.monotonic()
    code, stderr, peak = run_measured(protein_process, command)
    elapsed = time.monotonic() - started
    # 8 of the million images exist: the first missing one ends the run, with one line.
    assert code == 2, stderr[-2000:]
    assert "train/8.png: file not found" in stderr and "Traceback" not in stderr
    assert peak - idle < 1024, f"peak RSS {peak:.0f} MiB, {peak - idle:.0f} MiB over an idle import"
    assert not (tmp_path / "store" / "models").exists()
    assert not list((tmp_path / "cache").glob("*.npy"))  # the 3 GB sparse cache file was removed
    print(f"\n1,000,000-row train.csv: exit 2 after {elapsed:.1f}s, peak RSS {peak:.0f} MiB "
          f"(idle import {idle:.0f} MiB)")


# Runs the command as its child and reports the child's own peak RSS. A process forked straight
# from pytest would report pytest's size as its peak (Linux keeps the pre-exec high-water mark).
MEASURE = """
import json, os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"code": os.waitstatus_to_exitcode(status), "peak_kib": usage.ru_maxrss}))
"""


def run_measured(process: ProteinProcess, command: list[str], timeout: float = 180) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS in MiB of one process."""
    try:
        result = process.python(MEASURE, *command, env=ONE_THREAD, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command} still running after {timeout}s (a hang)")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["code"], result.stderr, report["peak_kib"] / 1024
