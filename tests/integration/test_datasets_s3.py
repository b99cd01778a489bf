"""Datasets in S3 against a real moto_server: s3:// prefixes (Kaggle's nested layout included) and
zips through the download cache, resume and redo of partial downloads, objects changing mid-download,
bad URIs, and `protein datasets push/list`."""

import json
import logging
import os
import time

import boto3
import pytest

from bench.dataset_push import push_full_copy
from protein.cache_budget import cache_entries
from protein.cli import main as protein_main
from protein.data import data_cache_dir, fingerprint, load_competition, open_dataset
from protein.data.dataset_gc import apply_objects_gc, plan_objects_gc
from protein.data.manifest import object_key
from protein.data.push import list_datasets, push_dataset
from protein.data.s3 import fetch_object
from protein.errors import DataError, IntegrityError, StoreError
from protein.storage import S3Store, open_store
from tests.helpers import write_dataset, write_kaggle_dataset, write_png, zip_folder

pytestmark = pytest.mark.integration

LABELS = {"1": "0", "2": "6 4", "3": "9", "4": "1"}
TEST_IDS = ["12", "10", "11"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))
    return data_cache_dir()


@pytest.fixture
def kaggle(tmp_path):
    return write_kaggle_dataset(tmp_path / "jovian-pytorch-z2g", LABELS, TEST_IDS)


@pytest.fixture
def bucket(s3_bucket):
    return s3_bucket.removeprefix("s3://").split("/")[0]


def upload_folder(bucket, folder, prefix):
    client = boto3.client("s3")
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, prefix + path.relative_to(folder).as_posix())


def cached_files(cache):
    return sorted(p for p in cache.rglob("*") if p.is_file() and p.parent.name not in ("locks", "hashes"))


def test_kaggle_layout_under_a_prefix_reads_once_and_matches_the_local_fingerprint(kaggle, bucket, cache):
    upload_folder(bucket, kaggle, "competition/")  # keys with spaces: "competition/Human protein atlas/..."
    uri = f"s3://{bucket}/competition/"
    data = load_competition(uri)
    assert data.train_ids == list(LABELS) and data.test_ids == TEST_IDS
    assert data.source.locate("train/2.png") == f"s3://{bucket}/competition/Human protein atlas/train/2.png"
    assert fingerprint(data.source) == fingerprint(open_dataset(kaggle))
    # The fingerprint came from the listing's ETags: only the two CSVs (read to parse them) were downloaded.
    assert len([p for p in cached_files(cache) if p.name.startswith("s3-")]) == 2

    assert data.source.read_bytes("test/10.png") == (kaggle / "Human protein atlas/test/10.png").read_bytes()
    test_copies = [p for p in cached_files(cache) if p.name.startswith("s3-")]
    assert len(test_copies) == 2 + len(TEST_IDS)  # both CSVs, and the first test image brought test/, not train/

    # Cached copies are reused: with the objects gone, a fresh source (listing taken before) still reads.
    again = open_dataset(uri)
    boto3.client("s3").delete_object(Bucket=bucket, Key="competition/Human protein atlas/test/11.png")
    assert again.read_bytes("test/11.png") == (kaggle / "Human protein atlas/test/11.png").read_bytes()
    assert open_dataset(f"s3://{bucket}/competition").description == f"s3://{bucket}/competition"
    assert fingerprint(open_dataset(uri)) != fingerprint(data.source)  # an image less: another fingerprint


def test_an_encrypted_prefix_takes_its_md5s_from_the_bytes_not_the_etags(kaggle, bucket, cache):
    """Under SSE-KMS an ETag is not the MD5 of the bytes (moto's still are; AWS's are not): the
    fingerprint then comes from the bytes, and equals the same files' anywhere else."""
    client = boto3.client("s3")
    for path in sorted(kaggle.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, "kms/" + path.relative_to(kaggle).as_posix(),
                               ExtraArgs={"ServerSideEncryption": "aws:kms"})
    source = open_dataset(f"s3://{bucket}/kms/")
    assert source.files and all(remote.md5 is None for remote in source.files.values())
    assert fingerprint(source) == fingerprint(open_dataset(kaggle))
    assert not S3Store(bucket).etag_is_md5("kms/Human protein atlas/train.csv")
    upload_folder(bucket, kaggle, "plain/")
    assert S3Store(bucket).etag_is_md5("plain/Human protein atlas/train.csv")
    assert all(remote.md5 is not None for remote in open_dataset(f"s3://{bucket}/plain/").files.values())


def test_an_encrypted_prefix_is_downloaded_and_hashed_once_per_source(kaggle, bucket, cache, monkeypatch):
    """Training and the gate take the fingerprint and then the split's image digests from one source;
    each call of digests() fetched and hashed every object whose ETag is no MD5 (SSE-KMS, multipart)
    again, so the whole prefix was hashed twice (downloaded twice where the cache had evicted it)."""
    import protein.data.s3 as s3

    client = boto3.client("s3")
    for path in sorted(kaggle.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, "kms/" + path.relative_to(kaggle).as_posix(),
                               ExtraArgs={"ServerSideEncryption": "aws:kms"})
    data = load_competition(f"s3://{bucket}/kms/", require_test=False)
    downloaded, hashed = [], []
    download, md5_file = s3._download_verified, s3.md5_file
    monkeypatch.setattr(s3, "_download_verified", lambda store, remote, path: (downloaded.append(remote.key),
                                                                                 download(store, remote, path))[1])
    monkeypatch.setattr(s3, "md5_file", lambda path: (hashed.append(path), md5_file(path))[1])
    first = fingerprint(data.source)
    digests = data.train_image_digests()
    assert fingerprint(data.source) == first == fingerprint(open_dataset(kaggle))
    assert len(set(digests.values())) == len(LABELS)
    assert len(hashed) == len(data.source.files)  # every object once: two CSVs, train and test images
    assert sorted(downloaded) == sorted(set(downloaded))


def test_a_prefix_encrypted_differently_per_object_takes_each_etag_for_what_it_is(kaggle, bucket, cache, monkeypatch):
    """train.csv under SSE-S3 and the images under SSE-KMS (a bucket's default switched to KMS later):
    one HEAD of train.csv took every image's ETag for an MD5, so the fingerprint was another than the
    same files' elsewhere, and a push from the prefix failed with "changed while being pushed"."""
    client = boto3.client("s3")
    for path in sorted(kaggle.rglob("*")):
        if path.is_file():
            extra = {} if path.suffix == ".csv" else {"ExtraArgs": {"ServerSideEncryption": "aws:kms"}}
            client.upload_file(str(path), bucket, "mixed/" + path.relative_to(kaggle).as_posix(), **extra)
    source = open_dataset(f"s3://{bucket}/mixed/")
    assert source.files["train.csv"].md5 is not None
    images = [name for name in source.files if name.endswith(".png")]
    assert images and all(source.files[name].md5 is None for name in images)
    assert fingerprint(source) == fingerprint(open_dataset(kaggle))
    csv = source.files["train.csv"]
    assert S3Store(bucket).etag_is_md5(csv.key, csv.etag)
    assert not S3Store(bucket).etag_is_md5(csv.key, '"' + "0" * 32 + '"')  # a HEAD of another version
    # What each HEAD said is kept per key and ETag: the prefix opened again asks nothing.
    monkeypatch.setattr(S3Store, "etag_is_md5", lambda *args: pytest.fail("HEAD repeated"))
    assert open_dataset(f"s3://{bucket}/mixed/").files == source.files


def test_decode_worker_processes_read_an_s3_dataset(kaggle, bucket, cache, monkeypatch):
    import numpy as np

    import protein.cache

    upload_folder(bucket, kaggle, "w/")
    source = open_dataset(f"s3://{bucket}/w/")
    rels = [f"train/{i}.png" for i in LABELS]
    monkeypatch.setattr(protein.cache, "CHUNK", 1)  # one image per task: every worker process reads from S3
    out = np.zeros((len(rels), 32, 32, 3), np.uint8)
    protein.cache.decode_all(source, rels, 32, out, workers=2)
    local = open_dataset(kaggle)
    expected = [protein.cache.load_image(local.read_bytes(r), r, 32) for r in rels]
    assert np.array_equal(out, np.stack(expected))
    assert len([p for p in cached_files(cache) if p.name.startswith("s3-")]) == len(LABELS)  # train/ only, once each


def test_zip_in_s3_resumes_a_partial_download_and_redoes_a_bad_one(kaggle, bucket, tmp_path, cache, caplog):
    local_zip = zip_folder(kaggle, tmp_path / "jovian-pytorch-z2g.zip")
    boto3.client("s3").upload_file(str(local_zip), bucket, "kaggle/jovian-pytorch-z2g.zip")
    store = S3Store(bucket)
    [info] = store.list_objects("kaggle/jovian-pytorch-z2g.zip")
    blob = local_zip.read_bytes()
    folder = cache / "zips"

    final = fetch_object(store, info, folder, ".zip")  # to learn the cache names, then start over
    part = final.with_name(final.name + ".part")
    final.unlink()
    part.write_bytes(blob[: len(blob) // 2])  # an interrupted download
    with caplog.at_level(logging.INFO, logger="protein.data.s3"):
        assert fetch_object(store, info, folder, ".zip").read_bytes() == blob
    assert f"resuming the download at byte {len(blob) // 2} of {len(blob)}" in caplog.text
    assert not part.exists()

    final.unlink()
    part.write_bytes(b"\0" * (len(blob) // 2))  # a partial copy that is not the object's bytes
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="protein.data.s3"):
        assert fetch_object(store, info, folder, ".zip").read_bytes() == blob
    assert "does not match the object; downloading it again" in caplog.text

    data = load_competition(f"s3://{bucket}/kaggle/jovian-pytorch-z2g.zip")
    assert data.test_ids == TEST_IDS
    assert data.source.locate("train/1.png").startswith(f"s3://{bucket}/kaggle/jovian-pytorch-z2g.zip!")
    assert fingerprint(data.source) == fingerprint(open_dataset(kaggle))


def test_objects_changing_during_the_download_are_refused_and_nothing_is_cached(kaggle, bucket, tmp_path, cache):
    upload_folder(bucket, kaggle, "ds/")
    source = open_dataset(f"s3://{bucket}/ds/")  # the listing fixes the versions to read
    write_png(tmp_path / "other.png", seed=77)
    changed_key = "ds/Human protein atlas/train/3.png"
    boto3.client("s3").upload_file(str(tmp_path / "other.png"), bucket, changed_key)
    with pytest.raises(StoreError, match=rf"^s3://{bucket}/{changed_key}: changed \(no longer ETag .*\) during the "
                                         r"download; nothing was cached"):
        source.read_bytes("train/1.png")
    assert not source.local_path(source.files["train/3.png"]).exists()
    assert not [p for p in cache.rglob("*.tmp")]

    # The same for a zip replaced between its listing and its download: no .part, no copy.
    local_zip = zip_folder(kaggle, tmp_path / "k.zip")
    client = boto3.client("s3")
    client.upload_file(str(local_zip), bucket, "k.zip")
    store = S3Store(bucket)
    [stale] = store.list_objects("k.zip")
    client.put_object(Bucket=bucket, Key="k.zip", Body=local_zip.read_bytes() + b"x")
    with pytest.raises(StoreError, match=rf"^s3://{bucket}/k.zip: changed .* nothing was cached"):
        fetch_object(store, stale, cache / "zips", ".zip")
    assert [p.name for p in (cache / "zips").iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("suffix,code,needle", [
    ("nothing/", 2, "no objects under this prefix (expected train.csv with train/ and test/"),
    ("junk/", 2, "not the competition layout: expected train.csv"),
    ("junk/readme.txt", 2, "an object, not a dataset"),
])
def test_bad_s3_uris_get_one_line_and_exit_2(bucket, suffix, code, needle, capsys):
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="junk/readme.txt", Body=b"hi")
    client.put_object(Bucket=bucket, Key="junk/images/1.png", Body=b"x")
    uri = f"s3://{bucket}/{suffix}"
    assert protein_main(["train", "--data", uri, "--store", f"s3://{bucket}/store", "--epochs", "1"]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"protein train: error: {uri.rstrip('/')}") and needle in err[0]


def test_missing_bucket_is_a_store_error_exit_3(s3_env, capsys):
    assert protein_main(["validate", "--data", "s3://no-such-bucket-here/ds/", "--store", "work-store"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["protein validate: error: s3://no-such-bucket-here: bucket 'no-such-bucket-here' does not exist"]


def test_push_list_and_read_back(kaggle, s3_bucket, bucket, tmp_path, capsys):
    assert protein_main(["datasets", "push", "--data", str(kaggle), "--store", s3_bucket]) == 0
    pushed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    local_fp = fingerprint(open_dataset(kaggle))
    assert pushed["fingerprint"] == local_fp and pushed["uri"] == f"{s3_bucket}/datasets/{local_fp}/"
    assert pushed["files"] == 2 + len(LABELS) + len(TEST_IDS) and not pushed["already_pushed"]

    # Only the manifest under datasets/<fp>/: it maps each canonical name to a content object by SHA-256.
    store = open_store(s3_bucket)
    assert store.list(f"datasets/{local_fp}/") == [f"datasets/{local_fp}/manifest.json"]
    manifest = json.loads(store.get_bytes(f"datasets/{local_fp}/manifest.json"))
    assert manifest["format"] == "protein-dataset/2" and "sample_submission.csv" in manifest["files"]
    assert set(manifest["files"]["train/1.png"]) == {"size", "md5", "sha256"}
    assert object_key(manifest["files"]["train/1.png"]["sha256"]) in store.list("datasets/objects/")

    back = load_competition(pushed["uri"])
    assert fingerprint(back.source) == local_fp and back.test_ids == TEST_IDS
    downloaded = tmp_path / "downloaded"
    for name in back.source.fingerprint_files():
        (downloaded / name).parent.mkdir(parents=True, exist_ok=True)
        (downloaded / name).write_bytes(back.source.read_bytes(name))
    assert fingerprint(open_dataset(downloaded)) == local_fp

    assert protein_main(["datasets", "push", "--data", str(zip_folder(kaggle, tmp_path / "k.zip")),
                         "--store", s3_bucket]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["already_pushed"] and again["uri"] == pushed["uri"]

    assert protein_main(["datasets", "list", "--json", "--store", s3_bucket]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["fingerprint"], r["train_images"], r["test_images"]) for r in rows] == [(local_fp, 4, 3)]


def test_an_incomplete_or_tampered_push_is_not_trusted(kaggle, s3_bucket, bucket, tmp_path, capsys):
    store = open_store(s3_bucket)
    result = push_dataset(str(kaggle), store)
    manifest = json.loads(store.get_bytes(f"datasets/{result.fingerprint}/manifest.json"))
    key = object_key(manifest["files"]["train/4.png"]["sha256"])
    object_uri = f"s3://{bucket}/prefix/{key}"

    # Other bytes of the same size under the object's name: the SHA-256 check on download names dataset,
    # file and key.
    size = manifest["files"]["train/4.png"]["size"]
    boto3.client("s3").put_object(Bucket=bucket, Key=f"prefix/{key}", Body=bytes(size))
    with pytest.raises(IntegrityError, match=rf"{result.uri.rstrip('/')} file train/4.png: content object "
                                             rf"{object_uri} does not match its SHA-256"):
        open_dataset(result.uri).read_bytes("train/4.png")
    # A re-push lists the object under the right name with the wrong size, and refuses to trust it.
    write_png(tmp_path / "evil.png", size=40, seed=66)
    boto3.client("s3").upload_file(str(tmp_path / "evil.png"), bucket, f"prefix/{key}")
    with pytest.raises(StoreError, match=rf"{key}: content object for train/4.png holds other bytes"):
        push_dataset(str(kaggle), store)

    # A missing object: one line, exit 3, nothing cached; pushing the same data again repairs it.
    store.delete(key)
    assert protein_main(["validate", "--data", result.uri]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"protein validate: error: {result.uri.rstrip('/')} file train/4.png: content object "
                   f"{object_uri} is missing from the store; nothing was cached (push the dataset again from "
                   "its source)"]
    assert push_dataset(str(kaggle), store).uploaded == 1
    original = (kaggle / "Human protein atlas/train/4.png").read_bytes()
    assert open_dataset(result.uri).read_bytes("train/4.png") == original

    # Without its manifest (a push that died before the end) the dataset is invisible and refused.
    store.delete(f"datasets/{result.fingerprint}/manifest.json")
    store.put_bytes(f"datasets/{result.fingerprint}/train.csv", b"a dead full-copy push")
    with pytest.raises(DataError, match=r"incomplete dataset push \(no manifest.json\)"):
        open_dataset(result.uri)
    rows, incomplete = list_datasets(store)
    assert rows == [] and incomplete == [f"datasets/{result.fingerprint}/"]


def test_a_grown_dataset_uploads_only_what_changed_and_old_full_copies_still_open(kaggle, s3_bucket, tmp_path,
                                                                                   cache):
    import numpy as np

    from protein.cache import ImageCache

    store = open_store(s3_bucket)
    first = push_dataset(str(kaggle), store)
    root = kaggle / "Human protein atlas"
    with open(root / "train.csv", "a") as f:
        f.write("5,2\n6,3\n")
    write_png(root / "train" / "5.png", seed=77)
    write_png(root / "train" / "6.png", seed=78)
    second = push_dataset(str(kaggle), store)
    assert second.uploaded == 3 and second.files == first.files + 2  # two images and train.csv
    back = load_competition(second.uri)
    assert fingerprint(back.source) == second.fingerprint == fingerprint(open_dataset(kaggle))
    assert back.source.locate("train/5.png") == f"{second.uri}train/5.png"
    decoded = ImageCache(tmp_path / "decoded").build(back, "train", 16)
    local = ImageCache(tmp_path / "decoded-local").build(load_competition(str(kaggle)), "train", 16)
    assert np.array_equal(np.asarray(decoded), np.asarray(local))

    # A dataset pushed before content addressing (format 1, a full copy) opens as it did.
    old_store = open_store(s3_bucket + "-v1")
    fp = push_full_copy(str(kaggle), old_store)
    assert f"datasets/{fp}/train/5.png" in old_store.list(f"datasets/{fp}/")
    old = load_competition(f"{s3_bucket}-v1/datasets/{fp}/")
    assert fingerprint(old.source) == fp and old.source.read_bytes("train/6.png") == (root / "train/6.png").read_bytes()
    assert push_dataset(str(kaggle), old_store).already_pushed


def test_gc_on_s3_keeps_named_objects_and_deletes_old_orphans(kaggle, s3_bucket, capsys):
    store = open_store(s3_bucket)
    pushed = push_dataset(str(kaggle), store)
    named = set(store.list("datasets/objects/"))
    orphan = object_key("c" * 64)
    store.put_bytes(orphan, b"left by a push that died")
    # Every object is younger than a day: the guard keeps the orphan (it may belong to a push in flight).
    assert protein_main(["datasets", "gc", "--store", s3_bucket]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["deleted"], out["kept_young_orphans"], out["named_objects"]) == (0, 1, len(named))
    # Ages are on the store's clock: a gc host whose clock runs two days fast still sees them young.
    real_time = time.time
    with pytest.MonkeyPatch.context() as host:
        host.setattr(time, "time", lambda: real_time() + 2 * 86400)
        assert plan_objects_gc(store, min_age_s=86400).orphans == []
    assert abs(store.clock() - time.time()) < 5  # moto's Date header: the machine's own clock
    # Seen from two days on, every object is old: only the orphan goes.
    plan = plan_objects_gc(store, min_age_s=86400, now=time.time() + 2 * 86400)
    assert plan.orphans == [orphan]
    assert apply_objects_gc(store, plan) == 1
    assert set(store.list("datasets/objects/")) == named
    source = open_dataset(pushed.uri)
    assert all(source.read_bytes(n) for n in source.fingerprint_files())


def test_a_dataset_in_a_local_store_is_a_plain_folder(tmp_path):
    flat = write_dataset(tmp_path / "flat", LABELS, TEST_IDS)
    store = open_store(str(tmp_path / "store"))
    result = push_dataset(str(zip_folder(flat, tmp_path / "f.zip")), store)
    assert fingerprint(open_dataset(result.uri)) == result.fingerprint == fingerprint(open_dataset(flat))

    write_png(flat / "train" / "copy of 1.png")  # a name no object key can carry
    with pytest.raises(DataError, match=r"train/copy of 1.png: this file name cannot be an object key"):
        push_dataset(str(flat), store)
    assert [row["fingerprint"] for row in list_datasets(store)[0]] == [result.fingerprint]


def test_the_download_cache_stays_within_its_bound_and_refetches_what_it_evicted(tmp_path, bucket, cache,
                                                                                   monkeypatch):
    first = write_dataset(tmp_path / "first", LABELS, TEST_IDS)
    upload_folder(bucket, first, "first/")
    old = load_competition(f"s3://{bucket}/first/")
    old.source.fetch([f"train/{n}" for n in old.source.list_dir("train")])
    month_ago = time.time() - 30 * 86400
    for entry in cache_entries(cache.parent):
        for path in entry.paths:
            os.utime(path, (month_ago, month_ago))
    stale = {e.name for e in cache_entries(cache.parent)}
    assert len(stale) >= len(LABELS)
    old.source.read_bytes("train/2.png")  # a read is a use: this copy is no longer month-old
    used = stale - {e.name for e in cache_entries(cache.parent) if e.last_used < month_ago + 60}
    assert len(used) == 1
    stale -= used

    second = write_dataset(tmp_path / "second", {f"n{k}": v for k, v in LABELS.items()}, TEST_IDS, size=40)
    upload_folder(bucket, second, "second/")
    monkeypatch.setenv("PROTEIN_CACHE_MAX_GB", str(1 / 2**30))  # one byte: keep only what is in use
    new = load_competition(f"s3://{bucket}/second/")
    new.source.read_bytes("train/n1.png")  # fetches train/ of the second dataset, then enforces the bound
    left = {e.name for e in cache_entries(cache.parent)}
    assert not (stale & left), "the month-old copies of the first dataset were removed"
    assert any(name.startswith("datasets/objects/") for name in left), "the files just fetched stay"
    assert used <= left, "the copy read a moment ago stays"
    # A copy the bound removed is fetched again on the next read, with the same bytes.
    assert old.source.read_bytes("train/1.png") == (first / "train" / "1.png").read_bytes()
