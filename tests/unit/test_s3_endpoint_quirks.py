"""S3-compatible endpoints that answer differently from AWS (protein/storage/s3.py): each quirk is
played by botocore's Stubber, request by request, so no server is needed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.stub import ANY, Stubber

from protein.errors import PreconditionFailed, StoreError
from protein.modeling.checkpoints import check_still_ours, checkpoint_key
from protein.storage import s3 as s3_module
from protein.storage.s3 import ALLOW_LAST_WRITER_WINS_ENV, S3Store

BUCKET = "bucket"
RUN_ID = "r"
OBJECT_KEY = f"p/{checkpoint_key(RUN_ID)}"
BIG = b"x" * 100  # over the test's multipart threshold


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> S3Store:
    import boto3.session

    monkeypatch.delenv(ALLOW_LAST_WRITER_WINS_ENV, raising=False)
    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 64)  # the probe's writes stay single PUTs
    client = boto3.session.Session().client(
        "s3", region_name="us-east-1", endpoint_url="http://127.0.0.1:9",
        aws_access_key_id="testing", aws_secret_access_key="testing")
    store = S3Store(BUCKET, "p")
    store._client_obj = client
    store._bucket_seen = True
    return store


@pytest.fixture
def stubber(store: S3Store) -> Iterator[Stubber]:
    with Stubber(store._client_obj) as stub:
        yield stub
        stub.assert_no_pending_responses()


def head(stubber: Stubber, etag: str | None) -> None:
    if etag is None:
        stubber.add_client_error("head_object", service_error_code="404", http_status_code=404,
                                 expected_params={"Bucket": BUCKET, "Key": OBJECT_KEY})
    else:
        stubber.add_response("head_object", {"ETag": etag, "ContentLength": len(BIG)},
                             {"Bucket": BUCKET, "Key": OBJECT_KEY})


def multipart(stubber: Stubber, completed_etag: str, conditions: dict[str, Any]) -> None:
    stubber.add_response("create_multipart_upload", {"UploadId": "u1"},
                         {"Bucket": BUCKET, "Key": OBJECT_KEY, "Metadata": ANY})
    stubber.add_response("upload_part", {"ETag": '"part-1"'},
                         {"Bucket": BUCKET, "Key": OBJECT_KEY, "UploadId": "u1", "PartNumber": 1, "Body": ANY})
    stubber.add_response("complete_multipart_upload", {"ETag": completed_etag},
                         {"Bucket": BUCKET, "Key": OBJECT_KEY, "UploadId": "u1",
                          "MultipartUpload": {"Parts": [{"PartNumber": 1, "ETag": '"part-1"'}]}, **conditions})


def test_an_unquoted_multipart_etag_is_still_ours_when_head_quotes_it(store: S3Store, stubber: Stubber) -> None:
    """Ceph RGW answers CompleteMultipartUpload with `abc-2` and HEAD with `"abc-2"`: a checkpoint over
    the multipart threshold must not look superseded by the very write that made it, nor its next
    write (If-Match on the etag it returned) be refused before the upload starts."""
    head(stubber, None)  # create-only: checked before the parts are sent
    multipart(stubber, "abc-2", {"IfNoneMatch": "*"})
    etag = store.put_bytes(checkpoint_key(RUN_ID), BIG, if_none_match=True)
    assert etag == '"abc-2"'

    head(stubber, '"abc-2"')
    check_still_ours(store, RUN_ID, etag)

    head(stubber, '"abc-2"')  # the If-Match check before the next upload
    multipart(stubber, "def-2", {"IfMatch": '"abc-2"'})
    assert store.put_bytes(checkpoint_key(RUN_ID), BIG, if_match=etag) == '"def-2"'


# --- endpoints that refuse condition headers with 501 NotImplemented (versitygw, s3gw, AWS If-Match before 2024)


def probe_put(stubber: Stubber, conditions: dict[str, str], error: tuple[str, int] | None = None) -> None:
    expected = {"Bucket": BUCKET, "Key": ANY, "Body": ANY, "Metadata": ANY, **conditions}
    if error is None:
        stubber.add_response("put_object", {"ETag": '"probe"'}, expected)
    else:
        stubber.add_client_error("put_object", service_error_code=error[0], http_status_code=error[1],
                                 expected_params=expected)


def check_until_probe(stubber: Stubber) -> None:
    stubber.add_response("list_objects_v2", {}, {"Bucket": BUCKET, "Prefix": "p/", "MaxKeys": 1})


def test_a_refused_if_none_match_names_conditional_writes_and_the_opt_out(store: S3Store, stubber: Stubber) -> None:
    check_until_probe(stubber)
    probe_put(stubber, {"IfNoneMatch": "*"}, ("NotImplemented", 501))
    probe_put(stubber, {})  # the same write unconditionally goes through: the condition was refused
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    with pytest.raises(StoreError) as info:
        store.check()
    assert str(info.value).startswith("s3://bucket/p: the S3 endpoint http://127.0.0.1:9 does not implement "
                                      "If-None-Match (create-only writes) on PutObject; ")
    assert f"set {ALLOW_LAST_WRITER_WINS_ENV}=1" in str(info.value)


def test_a_refused_if_match_names_compare_and_swap(store: S3Store, stubber: Stubber) -> None:
    check_until_probe(stubber)
    probe_put(stubber, {"IfNoneMatch": "*"})
    probe_put(stubber, {"IfNoneMatch": "*"}, ("PreconditionFailed", 412))
    probe_put(stubber, {"IfMatch": ANY}, ("NotImplemented", 501))
    stubber.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": ANY})
    with pytest.raises(StoreError, match=r"does not implement If-Match \(compare-and-swap\) on PutObject; .*"
                                         f"{ALLOW_LAST_WRITER_WINS_ENV}=1"):
        store.check()


def test_with_the_opt_out_conditions_are_checked_by_head_and_resent_without_where_refused(
    store: S3Store, stubber: Stubber, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The conditions are checked by a HEAD just before each write: a writer that is behind still loses;
    only two racing between HEAD and write are last-writer-wins. The headers are still sent (the
    shipped bucket policy refuses create-only and swap writes without them: dropping them made every
    write on AWS "access denied"), and a write refused for carrying them (501) is sent again without."""
    monkeypatch.setenv(ALLOW_LAST_WRITER_WINS_ENV, "1")
    key = checkpoint_key(RUN_ID)
    plain = {"Bucket": BUCKET, "Key": OBJECT_KEY, "Body": ANY, "Metadata": ANY}

    head(stubber, None)  # an endpoint that honours them: sent, as the bucket policy requires
    stubber.add_response("put_object", {"ETag": '"v1"'}, {**plain, "IfNoneMatch": "*"})
    assert store.put_bytes(key, b"small", if_none_match=True) == '"v1"'

    head(stubber, '"v1"')  # one that refuses them: sent again without
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501,
                             expected_params={**plain, "IfMatch": '"v1"'})
    stubber.add_response("put_object", {"ETag": '"v2"'}, plain)
    assert store.put_bytes(key, b"small", if_match='"v1"') == '"v2"'

    head(stubber, '"v2"')  # one HEAD only, then the parts; the completion refused with the condition
    stubber.add_response("create_multipart_upload", {"UploadId": "u1"},
                         {"Bucket": BUCKET, "Key": OBJECT_KEY, "Metadata": ANY})
    stubber.add_response("upload_part", {"ETag": '"part-1"'},
                         {"Bucket": BUCKET, "Key": OBJECT_KEY, "UploadId": "u1", "PartNumber": 1, "Body": ANY})
    completion = {"Bucket": BUCKET, "Key": OBJECT_KEY, "UploadId": "u1",
                  "MultipartUpload": {"Parts": [{"PartNumber": 1, "ETag": '"part-1"'}]}}
    stubber.add_client_error("complete_multipart_upload", service_error_code="NotImplemented", http_status_code=501,
                             expected_params={**completion, "IfMatch": '"v2"'})
    stubber.add_response("complete_multipart_upload", {"ETag": '"v3"'}, completion)
    assert store.put_bytes(key, BIG, if_none_match=False, if_match='"v2"') == '"v3"'

    source = tmp_path / "weights"
    source.write_bytes(b"small")
    head(stubber, None)
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501,
                             expected_params={**plain, "IfNoneMatch": "*"})
    stubber.add_response("put_object", {"ETag": '"v4"'}, plain)
    store.put_file(key, source, if_none_match=True)

    head(stubber, '"v9"')  # another writer moved it: this one is behind and loses, nothing is written
    with pytest.raises(PreconditionFailed, match="changed since its etag was read"):
        store.put_bytes(key, b"small", if_match='"v2"')
    head(stubber, '"v9"')
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.put_bytes(key, b"small", if_none_match=True)


def test_without_the_opt_out_a_refused_condition_is_not_sent_again_without_it(store: S3Store, stubber: Stubber) -> None:
    stubber.add_client_error("put_object", service_error_code="NotImplemented", http_status_code=501)
    with pytest.raises(StoreError, match="NotImplemented"):
        store.put_bytes(checkpoint_key(RUN_ID), b"small", if_none_match=True)
    stubber.assert_no_pending_responses()


# --- endpoints that refuse botocore's default upload checksums (aws-chunked, trailing CRC32): GCS's S3 API

CHECKSUM_FIX = ("if the endpoint does not accept botocore's default upload checksums, set "
                "AWS_REQUEST_CHECKSUM_CALCULATION=when_required and AWS_RESPONSE_CHECKSUM_VALIDATION=when_required")


def test_a_refused_upload_names_the_checksum_setting(store: S3Store, stubber: Stubber) -> None:
    key = checkpoint_key(RUN_ID)
    stubber.add_client_error("put_object", service_error_code="InvalidArgument", http_status_code=400)
    with pytest.raises(StoreError) as info:
        store.put_bytes(key, b"small")
    assert str(info.value) == f"s3://bucket/p/{key}: S3 request PutObject failed (InvalidArgument); {CHECKSUM_FIX}"

    stubber.add_response("create_multipart_upload", {"UploadId": "u1"})
    stubber.add_client_error("upload_part", service_error_code="NotImplemented", http_status_code=501)
    stubber.add_response("abort_multipart_upload", {})
    with pytest.raises(StoreError) as info:
        store.put_bytes(key, BIG)
    assert str(info.value) == f"s3://bucket/p/{key}: S3 request UploadPart failed (NotImplemented); {CHECKSUM_FIX}"


def test_the_probe_blames_checksums_not_conditions_when_a_plain_write_is_refused_too(
    store: S3Store, stubber: Stubber
) -> None:
    check_until_probe(stubber)
    probe_put(stubber, {"IfNoneMatch": "*"}, ("NotImplemented", 501))
    probe_put(stubber, {}, ("NotImplemented", 501))
    with pytest.raises(StoreError) as info:
        store.check()
    assert str(info.value).endswith(f"S3 request PutObject failed (NotImplemented); {CHECKSUM_FIX}")
    assert ALLOW_LAST_WRITER_WINS_ENV not in str(info.value)


def test_a_head_answering_an_unquoted_etag_still_describes_the_listed_version(store: S3Store, stubber: Stubber) -> None:
    """The listing's ETags are quoted by the store; a HEAD spelling the same one bare is the same version.
    Compared as spelled, every object of such an endpoint's prefix was taken as changed (not an MD5),
    and the whole prefix downloaded and hashed on every host."""
    listed = '"d41d8cd98f00b204e9800998ecf8427e"'
    stubber.add_response("head_object", {"ETag": listed.strip('"'), "ContentLength": 0},
                         {"Bucket": BUCKET, "Key": "raw/train.csv"})
    assert store.etag_is_md5("raw/train.csv", listed) is True
