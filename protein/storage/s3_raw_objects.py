"""Reading objects other tools wrote (datasets under an S3 prefix): raw bucket keys, never used to write.

Keys such as "jovian/Human protein atlas/train.csv" fall outside `validate_key`'s alphabet; these
methods of `S3Store` take the full key in the bucket as listed, ignore the store's prefix, and only read.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import IO, Any

from protein.storage.base import COPY_CHUNK_SIZE, ListedObject, quoted_etag

# Server-side encryption whose objects' ETags are not the MD5 of their bytes (AWS documents the
# ETag as an MD5 only for single-part objects stored as plaintext or with SSE-S3).
OPAQUE_ETAG_ENCRYPTION = frozenset({"aws:kms", "aws:kms:dsse"})


class RawObjectReads:
    bucket: str

    def _client(self) -> Any:  # supplied by S3Store
        raise NotImplementedError

    def _translating(self, key: str | None = None,
                     operation: str | None = None) -> AbstractContextManager[None]:  # supplied by S3Store
        raise NotImplementedError

    def list_objects(self, prefix: str) -> list[ListedObject]:
        """Every object whose full key starts with ``prefix``, with its size and ETag, sorted by key."""
        client = self._client()
        found: list[ListedObject] = []
        with self._translating(prefix or None, operation="ListObjectsV2"):
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                found += [ListedObject(o["Key"], int(o["Size"]), quoted_etag(o["ETag"]))
                          for o in page.get("Contents", [])]
        return sorted(found, key=lambda o: o.key)

    def download_object(self, key: str, dest: IO[bytes], *, if_match: str | None = None, start: int = 0) -> str:
        """Stream the object's bytes from offset ``start`` into ``dest``; returns the ETag served.

        With ``if_match`` the server refuses (`PreconditionFailed`) once the object is no longer that
        version, so a download never mixes the bytes of two versions."""
        client = self._client()
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if if_match is not None:
            args["IfMatch"] = quoted_etag(if_match)
        if start:
            args["Range"] = f"bytes={start}-"
        with self._translating(key, operation="GetObject"):
            response = client.get_object(**args)
            for chunk in response["Body"].iter_chunks(COPY_CHUNK_SIZE):
                dest.write(chunk)
        served = response.get("ETag")
        return quoted_etag(served) if served else ""

    def etag_is_md5(self, key: str, etag: str | None = None) -> bool:
        """Whether the object's (single-part) ETag is the MD5 of its bytes: not under SSE-KMS or
        with a customer key (SSE-C), where a listing's ETag says nothing about the bytes. One HEAD.
        With ``etag`` (the listing's), also False when the object is no longer that version: the
        HEAD then describes another."""
        with self._translating(key, operation="HeadObject"):
            head = self._client().head_object(Bucket=self.bucket, Key=key)
        if etag is not None and quoted_etag(head.get("ETag", "")) != quoted_etag(etag):
            return False
        return head.get("ServerSideEncryption") not in OPAQUE_ETAG_ENCRYPTION and not head.get("SSECustomerAlgorithm")
