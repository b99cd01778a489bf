"""Dataset manifests (formats 1 and 2) and content-object keys: pure parsing, validation, key building."""

import hashlib

import pytest

from protein.data.digests import FileDigest
from protein.data.fingerprint import fingerprint_of
from protein.data.manifest import (
    FORMAT_CONTENT,
    FORMAT_FULL_COPY,
    ManifestEntry,
    digest_of_object_key,
    manifest_doc,
    manifest_key,
    object_key,
    parse_manifest,
)
from protein.errors import DataError

SHA = hashlib.sha256(b"pixels").hexdigest()


def entries() -> dict[str, ManifestEntry]:
    return {"train.csv": ManifestEntry(10, "a" * 32, "b" * 64), "train/1.png": ManifestEntry(6, "c" * 32, SHA)}


def doc(**changes: object) -> dict:
    files = entries()
    fp = fingerprint_of({n: FileDigest(e.size, e.md5) for n, e in files.items()})
    record = manifest_doc(fp, files, "2026-12-04T00:00:00+00:00", 1, 0)
    record.update(changes)
    return record


def test_object_keys_are_built_only_from_sha256_hex():
    assert object_key(SHA) == f"datasets/objects/{SHA[:2]}/{SHA}"
    for bad in (SHA.upper(), SHA[:-1], "../" + SHA[3:], SHA[:63] + "/", "", None):
        with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
            object_key(bad)  # type: ignore[arg-type]


def test_only_well_formed_object_keys_name_a_digest():
    assert digest_of_object_key(object_key(SHA)) == SHA
    wrong_fanout = f"datasets/objects/{'ff' if SHA[:2] != 'ff' else '00'}/{SHA}"
    for key in (wrong_fanout, f"datasets/objects/{SHA[:2]}/{SHA}.tmp", f"datasets/{SHA[:16]}/manifest.json",
                f"other/objects/{SHA[:2]}/{SHA}"):
        assert digest_of_object_key(key) is None


def test_manifest_keys_need_a_fingerprint():
    assert manifest_key("0123456789abcdef") == "datasets/0123456789abcdef/manifest.json"
    with pytest.raises(ValueError, match="not a dataset fingerprint"):
        manifest_key("../../champion")


def test_a_content_manifest_parses_and_maps_names_to_objects():
    manifest = parse_manifest(doc(), "m.json")
    assert manifest.format == FORMAT_CONTENT and manifest.content_addressed
    assert manifest.object_keys()["train/1.png"] == object_key(SHA)
    assert manifest.digests() == {"train.csv": FileDigest(10, "a" * 32), "train/1.png": FileDigest(6, "c" * 32)}
    full_copy = parse_manifest(doc(format=FORMAT_FULL_COPY), "m.json")
    assert not full_copy.content_addressed and full_copy.fingerprint == manifest.fingerprint


@pytest.mark.parametrize(("change", "needle"), [
    ({"format": "protein-dataset/9"}, r"m.json: format 'protein-dataset/9', expected one of"),
    ({"fingerprint": "0" * 16}, r"m.json: its files have fingerprint [0-9a-f]{16}, but it claims '0000"),
    ({"files": {"train.csv": {"size": 1, "md5": "a" * 32, "sha256": "B" * 64}}},
     r"entry for train.csv: sha256 'BBBB.*' is not 64 lowercase hex digits"),
    ({"files": {"train.csv": {"size": -1, "md5": "a" * 32, "sha256": "b" * 64}}},
     r"entry for train.csv: size -1 is not a non-negative integer"),
    ({"files": {"train.csv": {"size": 1, "md5": "a" * 31, "sha256": "b" * 64}}},
     r"entry for train.csv: md5 'a+' is not 32 lowercase hex digits"),
    ({"files": {"train.csv": {"size": 1, "md5": "a" * 32, "sha256": "b" * 64},
                "train/../../x.png": {"size": 1, "md5": "a" * 32, "sha256": "b" * 64}}},
     r"file name 'train/../../x.png' is not one a dataset holds"),
    ({"files": {"train/1.png": {"size": 1, "md5": "a" * 32, "sha256": "b" * 64}}}, r"lists no train.csv"),
])
def test_a_bad_manifest_is_one_line_naming_it(change, needle):
    with pytest.raises(DataError, match=needle):
        parse_manifest(doc(**change), "m.json")


def test_a_manifest_under_another_fingerprint_is_refused():
    good = doc()
    with pytest.raises(DataError, match=r"but it claims '[0-9a-f]{16}' under datasets/ffffffffffffffff/"):
        parse_manifest(good, "m.json", expected_fingerprint="f" * 16)
