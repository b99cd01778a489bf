"""Least privilege, enforced: the shipped role policies (deployments/iam/) on a moto_server that
authenticates and authorizes every request against its own IAM.

The server starts with INITIAL_NO_AUTH_ACTION_COUNT=3: the first three requests (create an admin user,
give it a policy, create its key) run unauthenticated, and every request after them must be signed by
a known key whose policies allow it. The admin creates the bucket and one IAM user per role with the
rendered policy; each step below then runs with one role's keys, passed the way production passes them
(AWS_* variables of boto3's standard chain).

What moto's enforcement cannot express (moto 5.2, moto/iam/access_control.py): it ignores every policy
Condition on S3 requests (no request context such as s3:prefix, s3:if-none-match or s3:if-match is
passed to the evaluator), so the ListBucket prefix conditions and the "create only" / "swap only" write
conditions are not enforced here; tests/unit/test_iam_documents.py checks them statically, and
tests/unit/test_iam_policies.py evaluates them (and the bucket policy) with tests/iam_evaluator.py and lints
every policy with parliament. Actions and resources (bucket and key ARNs, wildcards) are enforced, which is what every
refusal below relies on.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from deployments.iam import ROLES, render_policy
from tests.conftest import MotoServer, ProteinProcess
from tests.helpers import REPO, write_dataset

IMAGE = 32
PREFIX = "prod"
# Unauthenticated requests moto serves before enforcing: create_user, put_user_policy, create_access_key.
BOOTSTRAP_REQUESTS = 3
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def test_renderer_command_prints_the_policy(protein_process: ProteinProcess) -> None:
    result = protein_process.module("deployments.iam", "render", "--role", "publisher", "--store",
                                    "s3://ml-models/protein", env=dict(os.environ), cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == render_policy("publisher", "ml-models", "protein")


# --- the product under the policies, on an enforcing server ---------------------------------------------------


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str


@dataclass(frozen=True)
class IamStore:
    server: MotoServer
    bucket: str
    uri: str
    keys: dict[str, Keys]

    def env(self, role: str) -> dict[str, str]:
        """boto3's standard chain for one role, and nothing of the developer's own AWS set-up."""
        keys = self.keys[role]
        return {"AWS_ENDPOINT_URL": self.server.endpoint, "AWS_ACCESS_KEY_ID": keys.access_key_id,
                "AWS_SECRET_ACCESS_KEY": keys.secret_access_key, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, role: str = "admin") -> Any:
        import boto3

        keys = self.keys[role]
        return boto3.session.Session().client(
            "s3", endpoint_url=self.server.endpoint, region_name="us-east-1",
            aws_access_key_id=keys.access_key_id, aws_secret_access_key=keys.secret_access_key)

    def snapshot(self) -> dict[str, str]:
        """Every object under the store with its etag, read with the admin's key."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{PREFIX}/")
        return {o["Key"].removeprefix(f"{PREFIX}/"): o["ETag"] for page in pages for o in page.get("Contents", [])}


@pytest.fixture(scope="module")
def iam_store() -> Iterator[IamStore]:
    import boto3

    server = MotoServer(env={"INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_REQUESTS)})
    server.start()
    try:
        def iam_client(keys: Keys) -> Any:
            return boto3.session.Session().client(
                "iam", endpoint_url=server.endpoint, region_name="us-east-1",
                aws_access_key_id=keys.access_key_id, aws_secret_access_key=keys.secret_access_key)

        def new_user(iam: Any, name: str, policy: dict[str, Any] | None) -> Keys:
            iam.create_user(UserName=name)
            if policy is not None:
                iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
            key = iam.create_access_key(UserName=name)["AccessKey"]
            return Keys(key["AccessKeyId"], key["SecretAccessKey"])

        admin = new_user(iam_client(Keys("bootstrap", "bootstrap")), "admin", ADMIN_POLICY)
        iam = iam_client(admin)
        bucket = f"iam-{uuid.uuid4().hex[:12]}"
        keys = {"admin": admin, "nobody": new_user(iam, "nobody", None)}
        for role in ROLES:
            keys[role] = new_user(iam, f"protein-{role}", render_policy(role, bucket, PREFIX))
        store = IamStore(server, bucket, f"s3://{bucket}/{PREFIX}", keys)
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        server.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    return write_dataset(tmp_path_factory.mktemp("iam") / "ds", labels, ["900", "901", "902"], size=IMAGE)


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def protein(process: ProteinProcess, store: IamStore, role: str, *args: str, cache: Path) -> Ran:
    """`protein ARGS` in a subprocess, with one role's keys (the real entry point, imports included)."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env = {**inherited, **ONE_THREAD, **store.env(role), "PROTEIN_CACHE_DIR": str(cache)}
    result = process.module("protein.cli", *args, env=env, timeout=600)
    return Ran(result.returncode, result.stdout, result.stderr)


@pytest.fixture
def cli(iam_store: IamStore, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """`protein ARGS` in this process with one role's keys: the CLI's own main(), so the same exit codes
    and error lines, without paying a torch import per command on a loaded 2-core machine."""
    from protein.cli import main

    def run(role: str, *args: str) -> Ran:
        use_role(monkeypatch, iam_store, role)
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def assert_refused(result: Ran, action: str, key: str) -> None:
    """One line naming the refused permission and the key, exit code 3 (store), no traceback."""
    assert result.returncode == 3, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines() if " error: " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    assert f"{PREFIX}/{key}" in errors[0] and f": access denied: {action} was refused" in errors[0], errors[0]
    assert "Traceback" not in result.stderr


def use_role(monkeypatch: pytest.MonkeyPatch, store: IamStore, role: str) -> None:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in store.env(role).items():
        monkeypatch.setenv(name, value)


@pytest.mark.integration
def test_enforcement_is_on(iam_store: IamStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not vacuous: a known user without a policy is refused, and an unknown key too."""
    from protein.errors import StoreError
    from protein.storage import open_store

    use_role(monkeypatch, iam_store, "nobody")
    with pytest.raises(StoreError, match="access denied: s3:ListBucket was refused"):
        open_store(iam_store.uri).check()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
    with pytest.raises(StoreError, match=r"S3 rejected the credentials \(InvalidAccessKeyId\)"):
        open_store(iam_store.uri).check()
    use_role(monkeypatch, iam_store, "trainer")
    open_store(iam_store.uri).check()


@pytest.mark.integration
def test_each_role_does_its_part_and_nothing_else(
    iam_store: IamStore, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any,
    protein_process: ProteinProcess,
) -> None:
    from protein.config import GateConfig
    from protein.evaluation.gate import decide
    from protein.pipeline import (
        evaluate_version,
        predict_and_publish,
        publish_training_plot,
        record_gate_decision,
    )
    from protein.registry import Registry
    from protein.storage import open_store
    from protein.validation import ValidationConfig, run_validation

    uri = iam_store.uri
    cache = tmp_path / "cache"

    # Publisher: creates objects under datasets/ (as `protein datasets push` does, through the store API: the
    # data branch's command is not merged here yet).
    use_role(monkeypatch, iam_store, "publisher")
    publisher_store = open_store(uri)
    publisher_store.check()
    for path in sorted(p for p in dataset.rglob("*") if p.is_file()):
        publisher_store.put_file(f"datasets/d0123456789abcdef/{path.relative_to(dataset)}", path, if_none_match=True)
    assert "datasets/d0123456789abcdef/train.csv" in publisher_store.list("datasets/")

    # Trainer: trains and registers (checkpoints under runs/, decoded-image cache under cache/).
    common = ["--store", uri, "--cache-dir", str(cache)]
    trained = protein(protein_process, iam_store, "trainer", "train", "--data", str(dataset), *common, "--epochs", "1",
                      "--image-size", str(IMAGE), "--batch-size", "8", "--device", "cpu", "--share-cache",
                      cache=cache)
    assert trained.returncode == 0, trained.stderr[-3000:]
    version = json.loads(trained.stdout.strip().splitlines()[-1])["model_id"]
    keys = iam_store.snapshot()
    assert f"models/{version}/model.json" in keys and f"models/{version}/model.safetensors" in keys
    assert any(k.startswith("runs/") for k in keys) and any(k.startswith("cache/") for k in keys)
    # An interrupted registration (weights without model.json), left by the trainer itself.
    use_role(monkeypatch, iam_store, "trainer")
    trainer_store = open_store(uri)
    trainer_store.put_bytes("models/20000101-000000-orphan/model.safetensors", b"partial", if_none_match=True)

    # ... but may not promote, delete or publish a submission; each refusal changes nothing.
    before = iam_store.snapshot()
    # A promotion moves the drift reference first (one step with the pointer): building it reads the
    # validation report of the version's data, and the trainer is refused there, before the pointer is touched.
    fingerprint = json.loads(open_store(uri).get_bytes(f"models/{version}/model.json"))["data_fingerprint"]
    assert_refused(cli("trainer", "models", "promote", version, "--store", uri),
                   "s3:GetObject", f"validation/{fingerprint}/report.json")
    assert_refused(cli("trainer", "models", "gc", "--older-than-hours", "0", "--store", uri),
                   "s3:DeleteObject", "models/20000101-000000-orphan/model.safetensors")
    predicted = cli("trainer", "predict", "--data", str(dataset), *common, "--model", version)
    assert_refused(predicted, "s3:PutObject", f"submissions/{version}/")
    assert iam_store.snapshot() == before

    # Trainer, as the score deployment on the GPU host: the gate's evaluation and the test set, kept under the
    # training run's runs/<run>/; it computes the submission but cannot publish it.
    from protein.run_results import predict_for_run, publish_run_submission, read_gate_evaluation, score_for_gate

    trained_run = json.loads(trained.stdout.strip().splitlines()[-1])
    run_id, data_fingerprint = trained_run["run_id"], trained_run["data_fingerprint"]
    score_for_gate(str(dataset), uri, run_id, version, None, device="cpu", cache_dir=cache)
    predict_for_run(str(dataset), uri, run_id, version, device="cpu", cache_dir=cache)
    scored = iam_store.snapshot()
    assert scored.keys() - before.keys() == {f"runs/{run_id}/{name}" for name in (
        "gate-evaluation.json", "gate-probs.npz", "submission.csv", "submission.json", "test-probs.npz")}
    before = scored

    # Publisher may not promote (it cannot even read the champion pointer).
    assert_refused(cli("publisher", "models", "promote", version, "--store", uri),
                   "s3:GetObject", "registry/champion.json")
    assert iam_store.snapshot() == before

    # Orchestrator: what the retrain flow's tasks call on the CPU host: validate, evaluate, gate, promote,
    # predict. The same library calls as tasks/validation.py, evaluation.py, registry.py, prediction.py.
    use_role(monkeypatch, iam_store, "orchestrator")
    report = run_validation(str(dataset), ValidationConfig(image_size=IMAGE), store_uri=uri)
    assert report.success, report.summary_lines()
    challenger_eval = evaluate_version(str(dataset), uri, version, cache_dir=cache)
    decision = decide(challenger_eval, None, GateConfig(min_score=0.0)).to_dict()
    assert decision["promote"], decision
    record_gate_decision(uri, version, None, decision, challenger_eval, None)
    publish_training_plot(uri, version, challenger_eval, None)
    registry = Registry(open_store(uri))
    assert registry.promote(version, expected_champion=None, reason="gate passed").champion == version
    submission = predict_and_publish(str(dataset), uri, "champion", cache_dir=cache)
    assert submission["model_id"] == version
    # ... and what the retrain run does with the score deployment's results: read the gate's evaluation,
    # publish the submission the GPU host computed.
    read = read_gate_evaluation(str(dataset), uri, run_id, version, None, data_fingerprint, cache_dir=cache)
    assert read["challenger"]["model_id"] == version
    published = publish_run_submission(str(dataset), uri, run_id, version, data_fingerprint, cache_dir=cache)
    assert published["key"].startswith(f"submissions/{version}/") and published["key"] != submission["key"]
    keys = iam_store.snapshot()
    for prefix in ("validation/", "gates/", "reports/", "submissions/", "registry/champion.json"):
        assert any(k.startswith(prefix) for k in keys), prefix
    # ... and the orchestrator deletes nothing either.
    before = iam_store.snapshot()
    assert_refused(cli("orchestrator", "models", "gc", "--older-than-hours", "0", "--store", uri),
                   "s3:DeleteObject", "models/20000101-000000-orphan/model.safetensors")

    # A second version (the trainer registers; the orchestrator promotes it by compare-and-swap).
    use_role(monkeypatch, iam_store, "trainer")
    weights = tmp_path / "weights.safetensors"
    trainer_store.get_file(f"models/{version}/model.safetensors", weights)
    spec = {k: v for k, v in Registry(trainer_store).spec(version).items()
            if k not in ("format", "id", "created", "weights_sha256", "weights_size", "code_version", "event",
                         "run_id")}
    second = Registry(open_store(uri)).register(weights, spec, version=f"{version}-b")
    use_role(monkeypatch, iam_store, "orchestrator")
    Registry(open_store(uri)).promote(second, expected_champion=version, reason="second")
    assert iam_store.snapshot().keys() - before.keys() == {f"models/{second}/model.json",
                                                           f"models/{second}/model.safetensors"}

    # Operator: the only role that deletes (gc) and rolls back. The module's store is shared: another test's
    # registered run may be collected too, but only runs that were there before gc.
    runs_before = {k.split("/")[1] for k in iam_store.snapshot() if k.startswith("runs/")}
    gc = cli("operator", "models", "gc", "--older-than-hours", "0", "--runs", "--run-min-age-hours", "0",
             "--store", uri)
    assert gc.returncode == 0, gc.stderr[-3000:]
    removed = json.loads(gc.stdout.strip().splitlines()[-1])
    assert removed["orphans"] == ["20000101-000000-orphan"], removed
    assert run_id in removed["runs"] and set(removed["runs"]) <= runs_before, (removed, runs_before)
    rolled = cli("operator", "models", "rollback", "--store", uri)
    assert rolled.returncode == 0, rolled.stderr[-3000:]
    after = iam_store.snapshot()
    assert "models/20000101-000000-orphan/model.safetensors" not in after
    # Checkpoints of the registered runs are gone; what a live version's model.json names stays (the module's
    # other test may have registered one on this store too).
    operator_registry = Registry(open_store(uri))
    named = {(operator_registry.spec(v).get("holdout") or {}).get("probs_key") for v in operator_registry.versions()}
    assert {version, second} <= set(operator_registry.versions())
    assert {k for k in after if k.startswith("runs/")} <= named, "checkpoints of the registered run are gone"
    use_role(monkeypatch, iam_store, "orchestrator")
    assert Registry(open_store(uri)).champion().champion == version
    # The operator never rewrites submissions.
    assert_refused(cli("operator", "predict", "--data", str(dataset), *common),
                   "s3:PutObject", f"submissions/{version}/")


@pytest.mark.integration
def test_results_forged_with_the_trainer_keys_are_refused(iam_store: IamStore, dataset: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          protein_process: ProteinProcess) -> None:
    """A GPU host's keys can write runs/<run>/: a verdict and a submission forged there, the record's SHA-256
    included, are refused by the orchestrator (one line), the champion stays and nothing is published."""
    import hashlib

    from protein.errors import EvidenceRefused
    from protein.registry import Registry
    from protein.run_results import predict_for_run, publish_run_submission, read_gate_evaluation, score_for_gate
    from protein.storage import open_store

    uri, cache = iam_store.uri, tmp_path / "cache"
    trained = protein(protein_process, iam_store, "trainer", "train", "--data", str(dataset), "--store", uri,
                      "--cache-dir", str(cache), "--epochs", "1", "--image-size", str(IMAGE), "--batch-size", "8",
                      "--device", "cpu", cache=cache)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run = json.loads(trained.stdout.strip().splitlines()[-1])
    version, run_id, data_fingerprint = run["model_id"], run["run_id"], run["data_fingerprint"]

    # The trainer scores as the score deployment does, then rewrites the results with its own keys.
    use_role(monkeypatch, iam_store, "trainer")
    score_for_gate(str(dataset), uri, run_id, version, None, device="cpu", cache_dir=cache)
    predict_for_run(str(dataset), uri, run_id, version, device="cpu", cache_dir=cache)
    trainer_store = open_store(uri)
    record = json.loads(trainer_store.get_bytes(f"runs/{run_id}/gate-evaluation.json"))
    record["evaluation"]["challenger"]["f1_samples"] = 1.0
    trainer_store.put_bytes(f"runs/{run_id}/gate-evaluation.json", json.dumps(record).encode())
    csv = trainer_store.get_bytes(f"runs/{run_id}/submission.csv")
    forged = csv.replace(b"\n900,", b"\n900,0 1 2 3 ", 1)
    assert forged != csv
    trainer_store.put_bytes(f"runs/{run_id}/submission.csv", forged)
    pointer = json.loads(trainer_store.get_bytes(f"runs/{run_id}/submission.json"))
    pointer["sha256"] = hashlib.sha256(forged).hexdigest()
    trainer_store.put_bytes(f"runs/{run_id}/submission.json", json.dumps(pointer).encode())

    # The orchestrator, as the retrain run: the gate never sees the verdict, the CSV is never published.
    use_role(monkeypatch, iam_store, "orchestrator")
    champion_before = Registry(open_store(uri)).champion()
    before = iam_store.snapshot()
    with pytest.raises(EvidenceRefused, match="f1_samples is not what the CPU host derives") as verdict:
        read_gate_evaluation(str(dataset), uri, run_id, version, None, data_fingerprint, cache_dir=cache)
    with pytest.raises(EvidenceRefused, match="submission.csv: line 2 is not what the CPU host derives") as csv_refused:
        publish_run_submission(str(dataset), uri, run_id, version, data_fingerprint, cache_dir=cache)
    for refused in (verdict.value, csv_refused.value):
        assert "\n" not in str(refused) and f"runs/{run_id}/" in str(refused)
    assert iam_store.snapshot() == before, "nothing published, nothing promoted"
    assert Registry(open_store(uri)).champion() == champion_before


@pytest.mark.integration
def test_push_and_datasets_gc_keep_out_of_each_others_way_under_their_roles(
    iam_store: IamStore, dataset: Path, monkeypatch: pytest.MonkeyPatch, cli: Any, tmp_path: Path
) -> None:
    """The publisher writes and removes its push marker; the operator takes and removes the gc lock, is
    refused (exit 9) while a push marker is live, and removes a stale one; the publisher may not delete
    the lock or content objects."""
    import time
    from dataclasses import replace

    from protein.data.dataset_gc import collect_orphans
    from protein.data.gc_coordination import DEFAULT_TIMES, GC_LOCK_KEY, PUSHES_PREFIX
    from protein.data.manifest import manifest_key, object_key
    from protein.errors import StoreError
    from protein.storage import open_store

    uri = iam_store.uri
    pushed = cli("publisher", "datasets", "push", "--data", str(dataset), "--store", uri, "--channel", "iam-gc")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    fingerprint = json.loads(pushed.stdout.strip().splitlines()[-1])["fingerprint"]
    assert not [k for k in iam_store.snapshot() if k.startswith(PUSHES_PREFIX)]  # its marker came and went

    use_role(monkeypatch, iam_store, "publisher")
    publisher = open_store(uri)
    for key in (GC_LOCK_KEY, object_key("e" * 64)):
        with pytest.raises(StoreError, match=rf"{PREFIX}/{key}: access denied: s3:DeleteObject was refused"):
            publisher.delete(key)
    # A push killed after its marker (which it would have removed), and an object no manifest names.
    killed = f"{PUSHES_PREFIX}killed.json"
    publisher.put_bytes(killed, b'{"host": "h", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}', if_none_match=True)
    publisher.put_bytes(object_key("e" * 64), b"left by a push that died", if_none_match=True)

    busy = cli("operator", "datasets", "gc", "--store", uri, "--older-than-hours", "0")
    assert busy.returncode == 9 and "Traceback" not in busy.stderr
    assert [line for line in busy.stderr.splitlines() if " error: " in line] == [
        f"protein datasets: error: deleted no content object: 1 push(es) in progress: {uri}/{killed} (host h pid 1 "
        "since 2026-01-01T00:00:00+00:00); run gc again when they end"]
    time.sleep(2.5)  # the marker goes stale after 2 s here (24 h in production)
    use_role(monkeypatch, iam_store, "operator")
    outcome = collect_orphans(open_store(uri), 0, times=replace(DEFAULT_TIMES, marker_stale_s=2))
    assert (outcome["stale_push_markers_removed"], outcome["deleted"]) == (1, 1)
    keys = iam_store.snapshot()
    assert manifest_key(fingerprint) in keys and object_key("e" * 64) not in keys
    assert GC_LOCK_KEY not in keys and not [k for k in keys if k.startswith(PUSHES_PREFIX)]

    # `datasets remove` under the operator's role: refused while the dataset is its channel's head (and while a
    # version trained on it, as every version here did on `dataset`), removed once the channel moved on; the
    # publisher may not delete a manifest.
    from protein.data.channels import advance_channel
    from tests.helpers import write_dataset

    with pytest.raises(StoreError, match=rf"{PREFIX}/{manifest_key(fingerprint)}: access denied"):
        publisher.delete(manifest_key(fingerprint))
    other = write_dataset(tmp_path / "other", {"1": "0", "2": "4"}, ["9"], size=16, seed=11)
    pushed = cli("publisher", "datasets", "push", "--data", str(other), "--store", uri, "--channel", "iam-rm")
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    unused = json.loads(pushed.stdout.strip().splitlines()[-1])["fingerprint"]
    # Runs on this store record their versions and resolutions in it: named, as the docs say, since the
    # store may hold no version yet when this test runs first.
    head = cli("operator", "datasets", "remove", "--store", uri, "--models-store", uri, unused, "--yes")
    assert head.returncode == 9 and "head of channel 'iam-rm'" in head.stderr, head.stderr[-2000:]
    use_role(monkeypatch, iam_store, "publisher")
    advance_channel(open_store(uri), "iam-rm", f"{uri}/datasets/{'f' * 16}/", "f" * 16, "moved-on", "iam", "2026-01-01")
    removed = cli("operator", "datasets", "remove", "--store", uri, "--models-store", uri, unused, "--yes")
    assert removed.returncode == 0, removed.stderr[-3000:]
    keys = iam_store.snapshot()
    assert manifest_key(unused) not in keys and manifest_key(fingerprint) in keys and GC_LOCK_KEY not in keys
