"""The role policy documents (deployments/iam/), read statically: only named S3 actions inside the
store, each role only its part, the write conditions that moto's enforcement cannot check
(tests/integration/test_iam.py runs the product under the policies), and the renderer's parameters."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployments.iam import BUCKET_POLICY, ROLES, parse_store, render_policy, template


def statements(role: str) -> list[dict[str, Any]]:
    return render_policy(role, "ml-models", "protein")["Statement"]


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def grants(role: str, action: str) -> list[str]:
    """Resources on which ``role`` is allowed ``action`` (by any statement, conditions aside)."""
    return [r for s in statements(role) if s["Effect"] == "Allow" and action in as_list(s["Action"])
            for r in as_list(s["Resource"])]


def test_policy_documents_grant_only_named_actions_inside_the_store() -> None:
    store_arn = "arn:aws:s3:::ml-models/protein/"
    for role in ROLES:
        for statement in statements(role):
            # Allows only, but for the Denys that narrow an Allow (the publisher's, on the gc lock; the
            # operator's, on the gate's records below gates/, which `gates/*.json` would match too).
            assert statement["Effect"] == "Allow" or statement.get("Sid") in {
                "NeverTheDatasetsGcLock", "NeverTheGateJudgementsOfDataOrRetrains"}, (role, statement)
            for action in as_list(statement["Action"]):
                # No wildcard actions, nothing account-wide, nothing that changes the bucket itself.
                assert action.startswith("s3:") and "*" not in action, (role, action)
                assert action not in {"s3:ListAllMyBuckets", "s3:CreateBucket", "s3:DeleteBucket",
                                      "s3:PutBucketPolicy", "s3:DeleteObjectVersion", "s3:PutBucketVersioning",
                                      "s3:PutLifecycleConfiguration"}, (role, action)
            for resource in as_list(statement["Resource"]):
                assert resource == "arn:aws:s3:::ml-models" or resource.startswith(store_arn), (role, resource)


def test_policy_documents_give_each_role_only_its_part() -> None:
    root = "arn:aws:s3:::ml-models/protein/"
    # Only the operator deletes data (the orchestrator only its own Data Docs pages), and never the champion
    # pointer, submissions, channels or records (`datasets gc` removes only orphaned content objects,
    # `datasets remove` a datasets/<fingerprint>/ folder nothing uses); the trainer may remove only its own
    # conditional-write probe (a scratch object under probes/).
    # The publisher removes only its own push markers (datasets/pushes/, which keep datasets gc away).
    # The orchestrator prunes its own Data Docs history beyond the newest runs (protein.validation.history):
    # objects it may overwrite anyway.
    assert sorted(grants("orchestrator", "s3:DeleteObject")) == [
        root + "validation/docs/validations/*", root + "validation/results/*"]
    assert grants("publisher", "s3:DeleteObject") == [root + "datasets/pushes/*"]
    assert grants("trainer", "s3:DeleteObject") == [root + "probes/*"]
    # gc deleting a version deletes the gate's record and reports on it too; the judgements below gates/
    # (of data, of a retrain's resolution) are denied.
    assert sorted(grants("operator", "s3:DeleteObject")) == [
        root + p for p in ("cache/*", "datasets/*/manifest.json", "datasets/*/sample_submission.csv",
                           "datasets/*/test/*", "datasets/*/train.csv", "datasets/*/train/*", "datasets/gc.lock",
                           "datasets/objects/*", "datasets/pushes/*", "gates/*.json", "models/*", "probes/*",
                           "registry/runs/*", "reports/*/*", "runs/*")]
    assert [(s["Action"], s["Resource"]) for s in statements("operator") if s["Effect"] == "Deny"] == [
        ("s3:DeleteObject", root + "gates/*/*")]
    # The trainer writes runs, caches, new versions and their run index; never the pointer or submissions.
    trainer_writes = set(grants("trainer", "s3:PutObject"))
    assert trainer_writes == {root + p for p in ("runs/*", "cache/*", "models/*", "registry/runs/*", "probes/*")}
    # It reads its probe back when the create-only PUT's answer was lost and the client's retry met the
    # probe itself (412): without the read, that 412 failed the store check before training.
    assert root + "probes/*" in grants("trainer", "s3:GetObject")
    # The orchestrator writes reports, gates, submissions and the pointer; never models or datasets.
    assert sorted(grants("orchestrator", "s3:PutObject")) == sorted(
        [root + p for p in ("validation/*", "gates/*", "reports/*", "submissions/*")]
        + [root + "registry/champion.json"] * 2)
    # The publisher touches datasets/ only, creates objects there only if absent, never the gc lock (a data
    # host could plant one that stalls gc and every push for an hour), and moves channel pointers.
    assert grants("publisher", "s3:GetObject") == [root + "datasets/*"]
    assert sorted(grants("publisher", "s3:PutObject")) == sorted([root + "datasets/*"] * 2
                                                                 + [root + "datasets/channels/*"])
    assert [(s["Action"], s["Resource"]) for s in statements("publisher") if s["Effect"] == "Deny"] == [
        ("s3:PutObject", root + "datasets/gc.lock")]


def test_policy_documents_state_the_write_conditions_moto_cannot_check() -> None:
    def conditions(role: str, resource_suffix: str) -> list[dict[str, Any]]:
        return [s.get("Condition") for s in statements(role)
                if "s3:PutObject" in as_list(s["Action"]) and any(r.endswith(resource_suffix)
                                                                  for r in as_list(s["Resource"]))]

    # Versions and run index entries are created only if absent (multipart parts exempt, they cannot carry
    # the header); the pointer changes only by compare-and-swap.
    assert conditions("trainer", "/models/*") == [{"Null": {"s3:if-none-match": "false"}},
                                                  {"Bool": {"s3:ObjectCreationOperation": "false"}}]
    assert conditions("trainer", "/registry/runs/*") == [{"Null": {"s3:if-none-match": "false"}}]
    assert conditions("orchestrator", "registry/champion.json") == [{"Null": {"s3:if-match": "false"}},
                                                                    {"Null": {"s3:if-none-match": "false"}}]
    assert conditions("operator", "registry/champion.json") == [{"Null": {"s3:if-match": "false"}}]
    # The datasets gc lock: taken create-only, taken over from a dead gc only by compare-and-swap.
    assert conditions("operator", "/datasets/gc.lock") == [{"Null": {"s3:if-none-match": "false"}},
                                                           {"Null": {"s3:if-match": "false"}}]
    # Listing is confined to the store's prefixes (and gives honest 404s there, see docs/security.md).
    listing = [s for s in statements("trainer") if s["Action"] == "s3:ListBucket"]
    assert listing[0]["Condition"]["StringLike"]["s3:prefix"][0] == "protein/"
    bucket = render_policy(BUCKET_POLICY, "ml-models", "protein")
    assert {s["Sid"] for s in bucket["Statement"]} >= {"RefusePlainHttp", "VersionsDatasetsAndRunIndexAreCreateOnly",
                                                      "ChampionPointerOnlyByCompareAndSwap",
                                                      "DatasetsGcLockOnlyCreatedOrSwapped"}
    assert conditions("publisher", "/datasets/*") == [{"Null": {"s3:if-none-match": "false"}},
                                                      {"Bool": {"s3:ObjectCreationOperation": "false"}}]
    # A channel pointer: created by a channel's first push (above), then moved only by compare-and-swap.
    assert conditions("publisher", "/datasets/channels/*") == [{"Null": {"s3:if-match": "false"}}]
    assert "DatasetChannelsOnlyCreatedOrSwapped" in {s["Sid"] for s in bucket["Statement"]}


def test_renderer_parameters() -> None:
    assert parse_store("s3://ml-models/protein/") == ("ml-models", "protein")
    at_root = render_policy("trainer", "ml-models", "")
    assert "Condition" not in at_root["Statement"][0]  # the whole bucket is the store
    assert at_root["Statement"][1]["Resource"][0] == "arn:aws:s3:::ml-models/datasets/*"
    assert "${" in json.dumps(template("trainer")) and "${" not in json.dumps(at_root)
    for bucket, prefix in (("ml-models", "a/*"), ("ml-models", "../x"), ("Bad_Bucket", "p"), ("ml-models", "a b")):
        with pytest.raises(ValueError, match=r"^(invalid S3 bucket name|invalid object key)"):
            render_policy("trainer", bucket, prefix)
    with pytest.raises(ValueError, match="unknown role"):
        render_policy("admin", "ml-models", "p")
