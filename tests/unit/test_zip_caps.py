"""Zip members are capped from the central directory and while inflating: a zip bomb costs the
reader no more memory than the cap, never the inflated size."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest

from protein.data import ZipSource, fingerprint
from protein.errors import DataError
from tests.conftest import ProteinProcess
from tests.helpers import REPO

BOMB_BYTES = 256 * 1024 * 1024  # inflated size of the bomb member; the zip itself is ~250 KB
ZEROS = bytes(1 << 20)


def write_bomb(path: Path) -> Path:
    """A dataset zip whose train/1.png inflates to 256 MiB of zeros."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("train.csv", "Image,Label\n1,0\n")
        zf.writestr("sample_submission.csv", "Image,Label\n2,0\n")
        with zf.open("train/1.png", "w", force_zip64=True) as member:
            for _ in range(BOMB_BYTES // len(ZEROS)):
                member.write(ZEROS)
        zf.writestr("test/2.png", b"\x89PNG")
    return path


def lie_in_the_directory(path: Path, member: str, declared: int) -> None:
    """Rewrite the central directory's uncompressed size of ``member`` to ``declared`` (the 32-bit field, or
    the zip64 extra field when that one says 0xFFFFFFFF)."""
    data = bytearray(path.read_bytes())
    name = member.encode()
    at = data.rfind(b"PK\x01\x02")  # scan every central directory header, last first
    while at != -1:
        name_len, extra_len = struct.unpack_from("<HH", data, at + 28)
        if bytes(data[at + 46: at + 46 + name_len]) == name:
            if struct.unpack_from("<I", data, at + 24)[0] != 0xFFFFFFFF:
                struct.pack_into("<I", data, at + 24, declared)
                path.write_bytes(bytes(data))
                return
            extra = at + 46 + name_len
            end = extra + extra_len
            while extra < end:
                tag, size = struct.unpack_from("<HH", data, extra)
                if tag == 0x0001:  # zip64: uncompressed size comes first
                    struct.pack_into("<Q", data, extra + 4, declared)
                    path.write_bytes(bytes(data))
                    return
                extra += 4 + size
        at = data.rfind(b"PK\x01\x02", 0, at)
    raise AssertionError(f"{member}: no central directory entry found")


MEASURE = """
import json, resource, sys
from protein.data import ZipSource, fingerprint
from protein.errors import DataError
source = ZipSource(sys.argv[1], cache_dir=sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    fingerprint(source)
    outcome = "fingerprinted"
except DataError as exc:
    outcome = str(exc)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_kib": after - before}))
"""


def fingerprint_in_a_subprocess(process: ProteinProcess, zip_path: Path, cache: Path) -> dict:
    done = process.script(MEASURE, str(zip_path), str(cache), timeout=300, cwd=REPO,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_bomb(tmp_path_factory.mktemp("bomb") / "bomb.zip")
    assert path.stat().st_size < 2 * 1024 * 1024
    return path


def test_a_zip_bomb_is_refused_from_its_directory_without_inflating(bomb, tmp_path, protein_process):
    result = fingerprint_in_a_subprocess(protein_process, bomb, tmp_path / "cache")
    assert result["outcome"].endswith(
        "bomb.zip!train/1.png: declares 268,435,456 bytes inflated, more than the 67,108,864-byte cap for a zip "
        "member; not inflated")
    # Peak RSS of the whole fingerprint call, in KiB: far below the 64 MiB cap (let alone 256 MiB).
    assert result["grew_kib"] < 16 * 1024, result


def test_a_directory_that_understates_the_member_is_refused_within_the_cap(bomb, tmp_path, protein_process):
    liar = tmp_path / "liar.zip"
    liar.write_bytes(bomb.read_bytes())
    lie_in_the_directory(liar, "train/1.png", 1000)
    assert ZipSource(liar, cache_dir=tmp_path / "c").size("train/1.png") == 1000
    result = fingerprint_in_a_subprocess(protein_process, liar, tmp_path / "cache")
    # The inflater stops at what the directory declared; the CRC then gives the lie away.
    assert "liar.zip!train/1.png: cannot read zip member" in result["outcome"], result
    assert result["grew_kib"] < 16 * 1024, result


def test_members_within_the_cap_are_read_and_fingerprinted_by_streaming(tmp_path):
    path = tmp_path / "ok.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train.csv", "Image,Label\n1,0\n")
        zf.writestr("sample_submission.csv", "Image,Label\n2,0\n")
        zf.writestr("train/1.png", ZEROS * 3)
        zf.writestr("test/2.png", b"\x89PNG")
    source = ZipSource(path, cache_dir=tmp_path / "c", max_member_bytes=3 * len(ZEROS))
    assert source.read_bytes("train/1.png") == ZEROS * 3
    assert len(fingerprint(source)) == 16
    tight = ZipSource(path, cache_dir=tmp_path / "c2", max_member_bytes=3 * len(ZEROS) - 1)
    with pytest.raises(DataError, match=r"ok\.zip!train/1\.png: declares 3,145,728 bytes inflated, more than "
                                        r"the 3,145,727-byte cap"):
        tight.read_bytes("train/1.png")


def test_a_broken_dataset_manifest_is_one_line_and_list_goes_on(tmp_path, caplog):
    from protein.data.digests import FileDigest
    from protein.data.fingerprint import fingerprint_of
    from protein.data.push import list_datasets
    from protein.storage import open_store

    store = open_store(str(tmp_path / "store"))
    entry = {"size": 3, "md5": "0" * 32, "sha256": "1" * 64}
    fp = fingerprint_of({"train.csv": FileDigest(3, "0" * 32)})
    good = {"format": "protein-dataset/1", "fingerprint": fp, "files": {"train.csv": entry}, "created": "2026-01-01"}
    store.put_bytes(f"datasets/{fp}/manifest.json", json.dumps(good).encode())
    store.put_bytes(f"datasets/{'b' * 16}/manifest.json", b"[]")
    rows, incomplete = list_datasets(store)
    assert [row["fingerprint"] for row in rows] == [fp] and incomplete == ["datasets/" + "b" * 16 + "/"]
    assert f"datasets/{'b' * 16}/manifest.json: not a dataset manifest: expected a JSON object, found a list" \
        in caplog.text
