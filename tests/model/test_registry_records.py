"""Bad records (one line naming the key, exit 8, no traceback) and records pinned to content."""

from __future__ import annotations

import hashlib
import json

import pytest

from protein.cli import main
from protein.errors import RecordError, RegistryError
from protein.pipeline import predict_and_publish
from protein.registry import CHAMPION_KEY, Registry, run_index_key
from protein.storage import S3Store, open_store
from protein.storage.records import MAX_RECORD_BYTES_ENV
from tests.model.test_registry import add_version


def rewrite(store, key: str, data: bytes) -> None:
    """Replace an object with bytes whose checksum metadata matches them (a consistent rewrite)."""
    store.delete(key)
    store.put_bytes(key, data)


def cli_error(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if " error: " in line or "Traceback" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


SPEC = "models/{v}/model.json"


@pytest.mark.integration
@pytest.mark.parametrize(("case", "key", "argv", "says"), [
    ("truncated-model-json", SPEC, ("models", "show", "{v}"), "not a model record: invalid JSON at line"),
    ("model-json-list", SPEC, ("models", "show", "{v}"), "not a model record: expected a JSON object, found a list"),
    ("model-json-no-weights-hash", SPEC, ("models", "show", "{v}"),
     "not a model record: field 'weights_sha256' is missing"),
    ("champion-json-list", CHAMPION_KEY, ("models", "list"),
     "not a champion pointer: expected a JSON object, found a list"),
    ("event-without-model-id", CHAMPION_KEY, ("models", "history"),
     "history[1]: not a champion history event: field 'model_id' is missing"),
    ("run-index-empty-object", "registry/runs/r1.json", ("models", "reindex"),
     "not a run index entry: field 'model_id' is missing"),
    ("huge-model-json", SPEC, ("models", "show", "{v}"), "bytes is larger than the 65,536-byte cap for this record"),
])
def test_bad_records_are_one_line_naming_the_key_exit_8(any_registry, trained, capsys, monkeypatch, case, key,
                                                         argv, says):
    registry, v = any_registry, trained["model_id"]
    registry.promote(v, expected_champion=None)
    second = add_version(registry, v, "second", run_id="r1")
    registry.promote(second, expected_champion=v)
    key = key.format(v=v)
    good = registry.store.get_bytes(key)
    doc = json.loads(good) if key.endswith(".json") else None
    bad = {
        "truncated-model-json": lambda: good[: len(good) // 2],
        "model-json-list": lambda: b"[]",
        "model-json-no-weights-hash": lambda: json.dumps({k: val for k, val in doc.items()
                                                          if k != "weights_sha256"}).encode(),
        "champion-json-list": lambda: b"[]",
        "event-without-model-id": lambda: json.dumps({**doc, "history": [
            doc["history"][0], {k: val for k, val in doc["history"][1].items() if k != "model_id"}]}).encode(),
        "run-index-empty-object": lambda: b"{}",
        "huge-model-json": lambda: good + b" " * 70_000,
    }[case]()
    rewrite(registry.store, key, bad)
    monkeypatch.setenv(MAX_RECORD_BYTES_ENV, "65536")
    code, line = cli_error(capsys, *[a.format(v=v) for a in argv], "--store", registry.store.uri)
    assert code == 8 and f"{registry.store.uri.rstrip('/')}/{key}" in line and says in line, line


@pytest.mark.integration
def test_models_list_marks_a_broken_version_and_goes_on(any_registry, trained, capsys):
    registry, v = any_registry, trained["model_id"]
    add_version(registry, v, "intact")
    key = f"models/{v}/model.json"
    rewrite(registry.store, key, registry.store.get_bytes(key)[:100])
    assert main(["models", "list", "--store", registry.store.uri]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"! {v}  BROKEN: {registry.store.uri.rstrip('/')}/{key}: not a model record")
    assert out[1].startswith("  intact  ")
    assert main(["models", "list", "--json", "--store", registry.store.uri]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [("broken" in row, row["id"]) for row in rows] == [(True, v), (False, "intact")]


def test_a_huge_record_is_refused_before_its_body_is_read(s3_bucket, monkeypatch):
    store = open_store(s3_bucket)
    assert isinstance(store, S3Store)
    store.put_bytes("registry/runs/big.json", b"{" + b" " * (2 * 1024 * 1024) + b"}")
    reads: list[int | None] = []
    client = store._client()
    real_get = client.get_object

    def get_object(**kwargs):
        response = real_get(**kwargs)
        body = response["Body"]
        real_read = body.read
        body.read = lambda amt=None: (reads.append(amt), real_read(amt))[1]
        return response

    monkeypatch.setattr(client, "get_object", get_object)
    monkeypatch.setenv(MAX_RECORD_BYTES_ENV, "1048576")
    with pytest.raises(RecordError, match=r"registry/runs/big\.json: 2,097,154 bytes is larger than the "
                                          r"1,048,576-byte cap for this record; not read"):
        Registry(store).find_by_run("big")
    assert reads == [], "the body was read although its Content-Length was over the cap"


# --- pinned records -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_promotion_events_pin_the_weights_and_model_json(any_registry, trained):
    registry, v = any_registry, trained["model_id"]
    state = registry.promote(v, expected_champion=None)
    spec_bytes = registry.store.get_bytes(f"models/{v}/model.json")
    event = state.history[-1]
    assert event["spec_sha256"] == hashlib.sha256(spec_bytes).hexdigest()
    assert event["weights_sha256"] == hashlib.sha256(registry.store.get_bytes(f"models/{v}/model.safetensors")
                                                     ).hexdigest()


@pytest.mark.integration
def test_weights_and_model_json_rewritten_together_are_refused(any_registry, trained, tmp_path, capsys):
    # Consistent with each other and with their checksum metadata: only the promotion's pins notice.
    registry, v = any_registry, trained["model_id"]
    registry.promote(v, expected_champion=None)
    weights_key, spec_key = f"models/{v}/model.safetensors", f"models/{v}/model.json"
    other = bytes(b ^ 0x5A for b in registry.store.get_bytes(weights_key))
    spec = json.loads(registry.store.get_bytes(spec_key))
    spec["weights_sha256"] = hashlib.sha256(other).hexdigest()
    rewrite(registry.store, weights_key, other)
    rewrite(registry.store, spec_key, json.dumps(spec, indent=2).encode())
    registry.require_intact(v)  # the pair is self-consistent
    for call in (lambda: registry.resolve("champion"), lambda: registry.download("champion", tmp_path / "dl"),
                 lambda: registry.download(v, tmp_path / "dl2")):
        with pytest.raises(RegistryError, match=f"model version {v}: model.json in .* is not the one its "
                                                "promotion pinned"):
            call()
    with pytest.raises(RegistryError, match="not the one its promotion pinned"):
        predict_and_publish(trained["data"], registry.store.uri, "champion", tmp_path / "sub.csv", trained["cache"])
    assert not (tmp_path / "sub.csv").exists() and registry.store.list("submissions/") == []
    code, line = cli_error(capsys, "models", "show", "champion", "--store", registry.store.uri)
    assert code == 4 and "is not the one its promotion pinned" in line


@pytest.mark.integration
def test_a_deleted_version_id_is_never_registered_again(any_registry, trained, tmp_path):
    registry, v = any_registry, trained["model_id"]
    doomed = add_version(registry, v, "doomed", run_id="doomed-run")
    local = registry.download(doomed, tmp_path / "dl")
    registry.delete_version(doomed)
    assert doomed not in registry.versions()
    spec = json.loads((local / "model.json").read_text())
    fields = {k: spec[k] for k in ("arch", "image_size", "class_names", "thresholds", "metrics")}
    with pytest.raises(RegistryError, match="model version doomed was deleted from .*; a deleted version id is "
                                            "never registered or promoted again"):
        registry.register(local / "model.safetensors", fields, version="doomed")
    # A rerun of the run that registered it reuses its claimed id: refused all the same.
    with pytest.raises(RegistryError, match="model version doomed was deleted"):
        registry.register(local / "model.safetensors", {**fields, "run_id": "doomed-run"})
    with pytest.raises(RegistryError, match="unknown model version 'doomed'"):
        registry.promote("doomed")
    assert registry.store.list("models/doomed/") == []


@pytest.mark.integration
def test_registration_is_idempotent_by_run_id(any_registry, trained, tmp_path):
    registry, v = any_registry, trained["model_id"]
    local = registry.download(v, tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    fields = {k: spec[k] for k in ("arch", "image_size", "class_names", "thresholds", "metrics")}
    # A crash between model.json and the run index: the rerun finds the version, registers nothing new.
    first = registry.register(local / "model.safetensors", {**fields, "run_id": "crashy"}, version="first-try")
    registry.store.delete(run_index_key("crashy"))
    again = registry.register(local / "model.safetensors", {**fields, "run_id": "crashy"}, version="second-try")
    assert again == first == "first-try"
    assert sorted(registry.versions()) == sorted([v, "first-try"]) and registry.find_by_run("crashy") == first
    # A crash after the weights, before model.json: the rerun completes that same version id.
    registry.store.put_file("models/half/model.safetensors", local / "model.safetensors", if_none_match=True)
    registry.store.put_bytes("registry/runs/claims/halfway.json",
                             json.dumps({"run_id": "halfway", "model_id": "half"}).encode(), if_none_match=True)
    assert registry.register(local / "model.safetensors", {**fields, "run_id": "halfway"}, version="new") == "half"
    assert "new" not in registry.versions() and registry.resolve("half") == "half"


def test_retrain_run_ids_differ_for_flow_runs_started_in_the_same_minute():
    """Prefect's flow-run ids are UUIDv7: their first 8 hex digits are a clock that moves every 65 s.
    Two retrains of the same data started within that minute (a push-triggered and a manual run, two
    configs launched back to back) must not share a training run id, or the later one returns the
    earlier one's model; every attempt of one flow run keeps its own (a retry resumes)."""
    from prefect._internal.uuid7 import uuid7

    from protein.registry.records import flow_training_run_id

    flow_run_ids = [uuid7() for _ in range(50)]
    assert len({str(i)[:8] for i in flow_run_ids}) == 1  # what the run id was built from before
    fingerprint = "ab" * 32
    assert len({flow_training_run_id(fingerprint, i) for i in flow_run_ids}) == 50
    first = flow_training_run_id(fingerprint, flow_run_ids[0])
    assert flow_training_run_id(fingerprint, str(flow_run_ids[0])) == first and first.startswith("abababab-")
