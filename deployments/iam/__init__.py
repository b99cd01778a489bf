"""Least-privilege IAM policies, one per role, rendered for one store (``s3://bucket/prefix``).

The JSON files beside this module are the policies, with ``${Bucket}`` and ``${StorePrefix}`` (the
store's prefix plus '/', or empty for a store at the bucket root) as parameters. docs/security.md
explains each statement and which operation needs it; tests/integration/test_iam.py runs the
product under them on a moto_server that enforces IAM.

    python -m deployments.iam render --role trainer --store s3://ml-models/protein > trainer.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from string import Template
from typing import Any

from protein.storage import validate_key

POLICY_DIR = Path(__file__).resolve().parent
# Host roles (IAM identity policies) and the bucket's own resource policy.
ROLES = ("trainer", "orchestrator", "publisher", "operator")
BUCKET_POLICY = "bucket-policy"
# S3 bucket naming rules: 3-63 characters, lower case, digits, '.' and '-', starting and ending alphanumeric.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def template(name: str) -> dict[str, Any]:
    """The unrendered policy document of a role (or of the bucket policy)."""
    if name not in (*ROLES, BUCKET_POLICY):
        raise ValueError(f"unknown role {name!r} (expected one of: {', '.join((*ROLES, BUCKET_POLICY))})")
    return json.loads((POLICY_DIR / f"{name}.json").read_text(encoding="utf-8"))


def parse_store(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: IAM policies are for S3 stores (s3://bucket/prefix)")
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def render_policy(name: str, bucket: str, prefix: str = "") -> dict[str, Any]:
    """The policy of role ``name`` for the store ``s3://bucket/prefix``, ready for IAM."""
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"invalid S3 bucket name {bucket!r}")
    prefix = prefix.strip("/")
    if prefix:
        # The key alphabet has no '*', '?' or '$': a prefix can never widen a resource or condition.
        validate_key(prefix)
    document = _substitute(template(name), {"Bucket": bucket, "StorePrefix": f"{prefix}/" if prefix else ""})
    if not prefix:
        # A store at the bucket root owns the whole bucket: listing it needs no prefix condition (and
        # an absent s3:prefix would never match one).
        for statement in document["Statement"]:
            if statement.get("Action") == "s3:ListBucket":
                statement.pop("Condition", None)
    return document


def _substitute(node: Any, values: dict[str, str]) -> Any:
    if isinstance(node, str):
        return Template(node).substitute(values)
    if isinstance(node, list):
        return [_substitute(item, values) for item in node]
    if isinstance(node, dict):
        return {key: _substitute(value, values) for key, value in node.items()}
    return node
