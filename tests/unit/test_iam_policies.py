"""The shipped policies (deployments/iam/) under a real policy linter, and their conditions (which moto
ignores, tests/integration/test_iam.py) under tests/iam_evaluator.py.

parliament's findings are refused at every severity (LOW and above): the policies are small enough to
keep clean, and an accepted finding would need a written reason here."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from deployments.iam import BUCKET_POLICY, ROLES, render_policy
from tests.iam_evaluator import allowed

BUCKET, PREFIX = "ml-models", "protein"
TLS = {"aws:SecureTransport": "true"}
# A dataset's folder is its fingerprint, 16 hex characters (protein/data/manifest.py FINGERPRINT); the
# bucket policy's create-only rule matches exactly that shape, so channels/ beside it can move.
FOLDER = "c0ffee0123456789"
ADMIN = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def lint(document: dict[str, Any]) -> list[str]:
    with warnings.catch_warnings():  # parliament imports pkg_resources, deprecated by setuptools
        warnings.simplefilter("ignore", UserWarning)
        from parliament import analyze_policy_string, enhance_finding

    policy = analyze_policy_string(json.dumps(document), include_community_auditors=True)
    return [f"{f.issue} ({enhance_finding(f).severity}): {f.detail}" for f in policy.findings]


@pytest.mark.parametrize("prefix", [PREFIX, ""])
@pytest.mark.parametrize("policy", [*ROLES, BUCKET_POLICY])
def test_parliament_finds_nothing_in_the_shipped_policies(policy: str, prefix: str) -> None:
    assert lint(render_policy(policy, BUCKET, prefix)) == []


def test_parliament_is_not_vacuous_here() -> None:
    broken = render_policy("trainer", BUCKET, PREFIX)
    broken["Statement"][1]["Action"] = ["s3:GetObjekt"]
    broken["Statement"].append({"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{BUCKET}/*"})
    findings = lint(broken)
    assert any(f.startswith("UNKNOWN_ACTION") for f in findings), findings
    assert any(f.startswith("RESOURCE_MISMATCH") for f in findings), findings


def obj(key: str) -> str:
    return f"arn:aws:s3:::{BUCKET}/{PREFIX}/{key}"


def put(role: str | dict[str, Any], key: str, *, if_none_match: bool = False, if_match: bool = False,
        creation: bool = True, tls: bool = True, bucket_policy: bool = True) -> bool:
    """A PUT (creation=True: PutObject or a multipart completion; False: a multipart step) as S3 would
    authorise it under the role's policy and the bucket policy."""
    context = {"aws:SecureTransport": str(tls).lower(), "s3:ObjectCreationOperation": str(creation).lower()}
    if if_none_match:
        context["s3:if-none-match"] = "*"
    if if_match:
        context["s3:if-match"] = '"0123abcd"'
    identity = render_policy(role, BUCKET, PREFIX) if isinstance(role, str) else role
    bucket = render_policy(BUCKET_POLICY, BUCKET, PREFIX) if bucket_policy else None
    return allowed(identity, bucket, "s3:PutObject", obj(key), context)


def test_versions_datasets_and_the_run_index_are_create_only() -> None:
    for role, key in (("trainer", "models/v1/model.json"), ("trainer", "registry/runs/r1.json"),
                      ("publisher", f"datasets/{FOLDER}/train.csv"), ("operator", "registry/runs/r1.json")):
        assert put(role, key, if_none_match=True), (role, key)
        assert not put(role, key), f"{role} overwrites {key} without If-None-Match"
        # Each layer on its own: the role's policy too, not only the bucket policy behind it.
        assert not put(role, key, bucket_policy=False), f"{role}'s own policy lets it overwrite {key}"
    # Multipart steps cannot carry the header; the completion must.
    assert put("trainer", "models/v1/model.safetensors", creation=False)
    assert put("trainer", "models/v1/model.safetensors", if_none_match=True)
    assert not put("trainer", "models/v1/model.safetensors")


def test_the_champion_pointer_moves_only_by_compare_and_swap() -> None:
    assert put("orchestrator", "registry/champion.json", if_match=True)
    assert put("orchestrator", "registry/champion.json", if_none_match=True)  # the first champion
    assert not put("orchestrator", "registry/champion.json")
    assert not put("orchestrator", "registry/champion.json", bucket_policy=False)
    assert put("operator", "registry/champion.json", if_match=True)
    assert not put("operator", "registry/champion.json", if_none_match=True)
    assert not put("operator", "registry/champion.json")
    assert not put("operator", "registry/champion.json", bucket_policy=False)
    assert not put("trainer", "registry/champion.json", if_match=True)


def test_only_the_operator_takes_the_datasets_gc_lock_and_only_conditionally() -> None:
    lock = "datasets/gc.lock"
    assert put("operator", lock, if_none_match=True)  # take it
    assert put("operator", lock, if_match=True)  # take over an abandoned one
    assert not put("operator", lock)
    assert not put("operator", f"datasets/{FOLDER}/manifest.json", if_match=True)  # no dataset rewritten by swap
    assert not put(ADMIN, lock) and put(ADMIN, lock, if_match=True)  # the bucket policy binds everyone
    assert not put("publisher", lock, if_match=True)
    # Nor create it: a data host could plant a lock that stalls gc and every push for an hour.
    assert not put("publisher", lock, if_none_match=True)
    assert put("publisher", f"datasets/{FOLDER}/manifest.json", if_none_match=True)
    assert put("publisher", "datasets/objects/ab/abcd", if_none_match=True)
    assert not put("publisher", "datasets/pushes/p1.json") and put("publisher", "datasets/pushes/p1.json",
                                                                  if_none_match=True)
    # Everything below datasets/<folder>/ stays create-only for every principal, the lock's exemption aside.
    for key in ("datasets/objects/ab/abcd", "datasets/pushes/p1.json", f"datasets/{FOLDER}/manifest.json"):
        assert not put(ADMIN, key, if_match=True) and put(ADMIN, key, if_none_match=True), key


def deletes(role: str, key: str) -> bool:
    bucket = render_policy(BUCKET_POLICY, BUCKET, PREFIX)
    return allowed(render_policy(role, BUCKET, PREFIX), bucket, "s3:DeleteObject", obj(key), TLS)


def test_push_markers_are_deleted_by_their_push_or_by_gc_and_nothing_else_by_the_publisher() -> None:
    assert deletes("publisher", "datasets/pushes/p1.json") and deletes("operator", "datasets/pushes/p1.json")
    assert deletes("operator", "datasets/gc.lock") and not deletes("publisher", "datasets/gc.lock")
    for key in ("datasets/objects/ab/abcd", f"datasets/{FOLDER}/manifest.json", "datasets/channels/latest.json"):
        assert not deletes("publisher", key), key
    # `datasets remove`: the operator deletes the names a dataset folder holds (a format-2 one only its
    # manifest), and still no channel. (The names, not a 16-character `?` pattern: moto's policy
    # evaluation turns `?` into a regex quantifier and fails every request, tests/integration/test_iam.py.)
    for key in ("manifest.json", "train.csv", "sample_submission.csv", "train/1.png", "test/2.png"):
        assert deletes("operator", f"datasets/{FOLDER}/{key}"), key
    for key in ("datasets/channels/latest.json", "datasets/manifest.json", f"datasets/{FOLDER}/report.json"):
        assert not deletes("operator", key), key


def test_the_operator_deletes_a_deleted_versions_gate_record_and_reports_and_no_other_gate_record() -> None:
    assert deletes("operator", "gates/20261207-000000-resnet18-abcd1234.json")
    assert deletes("operator", "reports/20261207-000000-resnet18-abcd1234/training.png")
    # The judgement of a dataset and config, and a retrain's resolved push, are the orchestrator's and stay.
    assert not deletes("operator", f"gates/by-data/{FOLDER}/0123456789abcdef.json")
    assert not deletes("operator", "gates/retrains/0b7c/resolved.json")
    assert not deletes("operator", "submissions/latest.json")
    for role in ("trainer", "publisher", "orchestrator"):
        assert not deletes(role, "gates/v1.json") and not deletes(role, "reports/v1/training.png"), role


def test_the_bucket_policy_binds_every_principal() -> None:
    # An administrator's keys (Allow *) still cannot rewrite a version, blindly set the pointer, or use plain HTTP.
    assert put(ADMIN, "models/v1/model.json", if_none_match=True)
    assert not put(ADMIN, "models/v1/model.json")
    assert not put(ADMIN, f"datasets/{FOLDER}/train.csv")
    assert not put(ADMIN, "registry/champion.json")
    assert put(ADMIN, "registry/champion.json", if_match=True)
    assert not put(ADMIN, "runs/r1/checkpoint.pt", tls=False)
    assert put(ADMIN, "runs/r1/checkpoint.pt")


def test_listing_is_confined_to_the_store() -> None:
    trainer = render_policy("trainer", BUCKET, PREFIX)
    bucket_policy = render_policy(BUCKET_POLICY, BUCKET, PREFIX)

    def lists(prefix: str) -> bool:
        return allowed(trainer, bucket_policy, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", {**TLS, "s3:prefix": prefix})

    assert lists(f"{PREFIX}/runs/r1/checkpoint.pt") and lists(f"{PREFIX}/")
    assert not lists("other-team/") and not lists("")
    assert not allowed(trainer, bucket_policy, "s3:ListBucket", f"arn:aws:s3:::{BUCKET}", TLS)  # no prefix at all


def test_a_channel_moves_by_compare_and_swap_and_its_history_is_never_overwritten_blindly() -> None:
    channel = "datasets/channels/latest.json"
    assert put("publisher", channel, if_none_match=True)  # a channel's first push
    assert put("publisher", channel, if_match=True)  # every later push appends by compare-and-swap
    assert not put("publisher", channel)
    assert not put("publisher", channel, bucket_policy=False), "the publisher's own policy allows a blind write"
    assert not put(ADMIN, channel) and put(ADMIN, channel, if_match=True)  # the bucket policy binds everyone
    for role in ("trainer", "orchestrator", "operator"):
        assert not put(role, channel, if_match=True), role
    # The channel's exemption from create-only is its own: a dataset folder that looks like one is not.
    for key in (f"datasets/{FOLDER}/manifest.json", f"datasets/{FOLDER}/channels/latest.json",
                "datasets/objects/ab/abcd", "datasets/pushes/p1.json"):
        assert not put("publisher", key, if_match=True) and not put(ADMIN, key, if_match=True), key
