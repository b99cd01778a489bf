"""S3-compatible endpoints that answer differently from AWS (protein/storage/s3.py): each quirk is
played by botocore's Stubber, request by request, so no server is needed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from botocore.stub import ANY, Stubber

from protein.modeling.checkpoints import check_still_ours, checkpoint_key
from protein.storage import s3 as s3_module
from protein.storage.s3 import S3Store

BUCKET = "bucket"
RUN_ID = "r"
OBJECT_KEY = f"p/{checkpoint_key(RUN_ID)}"
BIG = b"x" * 100  # over the test's multipart threshold


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> S3Store:
    import boto3.session

    monkeypatch.setattr(s3_module, "MULTIPART_THRESHOLD", 10)
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
