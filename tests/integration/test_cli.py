"""The `protein` command: exit codes and one-line errors. The cases run `protein.cli.main` in this
process (torch and Prefect imported once); one smoke test per verb runs the real entry point in a fresh
interpreter to show that what main returns and prints is what a user's shell gets."""

import json
import re
import shutil

import pytest

from tests.conftest import holding_a_closed_port
from tests.helpers import TINY_ARCH, write_dataset

pytestmark = pytest.mark.integration

VERBS = ("synth", "validate", "train", "evaluate", "predict", "models", "datasets", "cache", "archs", "link")


@pytest.fixture
def dataset(tmp_path):
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    return write_dataset(tmp_path / "ds", labels, ["900", "901", "902"], size=40)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_help_for_every_verb(protein_cli):
    for verb in VERBS:
        result = protein_cli(verb, "--help")
        assert result.returncode == 0 and "usage: protein" in result.stdout, verb


def smoke_cases(tmp_path):
    """Per verb: argv that fails on the data or the store (not on argparse), its exit code and the
    words its one error line must hold."""
    missing, store = str(tmp_path / "no-such-dataset"), str(tmp_path / "store")
    occupied = tmp_path / "occupied"
    (occupied / "x").mkdir(parents=True, exist_ok=True)
    return {
        "synth": (["synth", "--out", str(occupied)], 2, "occupied"),
        "validate": (["validate", "--data", missing, "--store", store], 2, "no-such-dataset"),
        "train": (["train", "--data", missing, "--store", store], 2, "no-such-dataset"),
        "evaluate": (["evaluate", "--data", missing, "--store", store, "--model", "nope"], 4, "nope"),
        "predict": (["predict", "--data", missing, "--store", store, "--model", "nope"], 4, "nope"),
        "models": (["models", "promote", "nope", "--store", store], 4, "nope"),
        "datasets": (["datasets", "push", "--data", missing, "--store", store], 2, "no-such-dataset"),
        "cache": (["cache", "gc", "--older-than-days", "1", "--cache-dir", str(tmp_path / "c"), "--store", "ftp://x/y"],
                  2, "ftp://x/y"),
        "link": (["link", "s3://bucket"], 2, "s3://bucket"),
    }


@pytest.mark.parametrize("verb", [verb for verb in VERBS if verb != "archs"])  # archs has no input to refuse
def test_real_entry_point_prints_one_error_line_and_exits_with_the_code(verb, protein_process, tmp_path):
    argv, code, needle = smoke_cases(tmp_path)[verb]
    result = protein_process.run(*argv)
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"protein {verb}: error: ") and needle in errors[0], (
        result.stderr[-2000:])


def test_in_process_results_are_the_entry_points(protein_cli, tmp_path):
    """The cases below run main in process: each smoke case gives the same code and line there."""
    for verb, (argv, code, needle) in smoke_cases(tmp_path).items():
        result = protein_cli(*argv)
        assert result.returncode == code, (verb, result.stderr)
        errors = error_lines(result.stderr)
        assert len(errors) == 1 and needle in errors[0], (verb, result.stderr)


def test_train_evaluate_predict_and_models_local(dataset, tmp_path, protein_cli):
    store, cache = str(tmp_path / "store"), str(tmp_path / "cache")
    train = protein_cli("train", "--data", str(dataset), "--store", store, "--cache-dir", cache, "--epochs", "1",
                        "--image-size", "32", "--batch-size", "8", "--arch", TINY_ARCH)
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert {"model_id", "path", "metrics"} <= set(result)
    model_id = result["model_id"]

    evaluate = protein_cli("evaluate", "--data", str(dataset), "--store", store, "--cache-dir", cache,
                           "--model", model_id)
    assert evaluate.returncode == 0, evaluate.stderr
    assert_evaluation_is_the_recorded_holdout(json.loads(evaluate.stdout), store, model_id, dataset)

    validate = protein_cli("validate", "--data", str(dataset), "--store", store, "--image-size", "40")
    assert validate.returncode == 0, validate.stderr
    assert json.loads(validate.stdout)["reference"]["source"].startswith("real train.csv")
    promote = protein_cli("models", "promote", model_id, "--store", store)
    assert promote.returncode == 0, promote.stderr
    # The champion's training data is now what drift is measured against.
    reference = json.loads((tmp_path / "store" / "validation" / "reference_profile.json").read_text())
    assert reference["model_id"] == model_id and reference["n"] == 24
    assert json.loads(promote.stdout)["reference_profile"]["hash"] == reference["hash"]
    listing = json.loads(protein_cli("models", "list", "--json", "--store", store).stdout)
    assert [(row["id"], row["champion"]) for row in listing] == [(model_id, True)]
    assert {"id", "created", "champion", "metrics"} <= set(listing[0])

    out = tmp_path / "submission.csv"
    predict = protein_cli("predict", "--data", str(dataset), "--store", store, "--cache-dir", cache,
                          "--out", str(out))
    assert predict.returncode == 0, predict.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "Image,Label" and [line.split(",")[0] for line in lines[1:]] == ["900", "901", "902"]

    # An unknown version on a store that has one: exit 4, and the error names the versions there are.
    unknown = protein_cli("predict", "--data", str(dataset), "--store", store, "--model", "nope")
    assert unknown.returncode == 4 and "unknown model version 'nope'" in unknown.stderr
    assert model_id in error_lines(unknown.stderr)[0], unknown.stderr


def assert_evaluation_is_the_recorded_holdout(evaluated: dict, store: str, model_id: str, dataset) -> None:
    """By default evaluate scores the rows the version held out when it trained, cross-fitted as
    training scored them: the metrics the version recorded, recomputed from its weights in the store."""
    from protein.modeling.ensemble import load_holdout_probs
    from protein.registry import Registry
    from protein.storage import open_store

    registry = Registry(open_store(store))
    spec = registry.spec(model_id)
    ids, _ = load_holdout_probs(registry.store, spec["holdout"]["probs_key"])
    assert sorted(evaluated["rows"]["ids"]) == sorted(ids)
    for name in ("f1_samples", "f1_micro", "f1_macro"):
        assert evaluated[name] == pytest.approx(spec["metrics"][name], abs=1e-6), (name, evaluated[name],
                                                                                 spec["metrics"][name])


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: (d / "train.csv").unlink(), "train.csv: file not found"),
    (lambda d: (d / "train.csv").write_text("Image,Labels\n1,0\n"), "missing column(s) Label"),
    (lambda d: (d / "train.csv").write_text("Image,Label\n0,1\n1,11\n"), "line 3 (Image '1'): expected class ids 0-9"),
    (lambda d: (d / "train" / "5.png").unlink(), "train/5.png: file not found"),
    (lambda d: (d / "train" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "train/5.png: not an image"),
])
def test_bad_input_one_line_error_exit_2_nothing_written(dataset, tmp_path, mutate, needle, protein_cli):
    mutate(dataset)
    store = tmp_path / "store"
    result = protein_cli("train", "--data", str(dataset), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
                         "--epochs", "1", "--image-size", "32")
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(error_lines(result.stderr)) == 1
    assert not (store / "models").exists()
    cache_files = list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else []
    assert not [f for f in cache_files if f.suffix == ".npy"], "no half-built cache may remain"


def test_bad_option_value_is_a_usage_error(dataset, tmp_path, protein_cli):
    result = protein_cli("train", "--data", str(dataset), "--store", str(tmp_path), "--image-size", "4")
    assert result.returncode == 2 and "image_size must be 16-1024" in result.stderr


def test_s3_missing_bucket_and_unreachable_endpoint(s3_env, dataset, tmp_path, protein_cli, monkeypatch, caplog):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SECRETfake1234567890")
    missing = protein_cli("models", "list", "--store", "s3://no-such-bucket/x")
    assert missing.returncode == 3
    assert "s3://no-such-bucket/x" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and "SECRETfake" not in missing.stderr + missing.stdout + caplog.text

    with holding_a_closed_port() as port:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        unreachable = protein_cli("train", "--data", str(dataset), "--store", "s3://bucket/x")
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_models_list_on_s3_marks_the_champion(s3_bucket, dataset, tmp_path, protein_cli):
    cache = str(tmp_path / "cache")
    train = protein_cli("train", "--data", str(dataset), "--store", s3_bucket, "--cache-dir", cache, "--epochs", "1",
                        "--image-size", "32", "--batch-size", "8", "--arch", TINY_ARCH)
    assert train.returncode == 0, train.stderr
    model_id = json.loads(train.stdout.strip().splitlines()[-1])["model_id"]
    assert protein_cli("models", "promote", model_id, "--store", s3_bucket).returncode == 0
    listing = protein_cli("models", "list", "--store", s3_bucket)
    assert listing.returncode == 0
    assert listing.stdout.startswith(f"* {model_id}")


def test_validate_leakage_exits_1_naming_both_files(dataset, tmp_path, protein_cli):
    shutil.copy(dataset / "train" / "3.png", dataset / "test" / "901.png")  # a train image reused as a test image
    result = protein_cli("validate", "--data", str(dataset), "--image-size", "40", "--report", str(tmp_path / "r"),
                         "--store", str(tmp_path / "store"))
    assert result.returncode == 1
    logged = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # log lines, not findings
    # Warnings and skipped checks are named on lines of their own; one line per failure.
    lines = [line for line in result.stderr.strip().splitlines()
             if not logged.match(line) and not line.startswith(("warning: ", "not checked: "))]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "expect_no_content_overlap_between_splits" in lines[0]
    assert "test/901.png" in lines[0] and "train/3.png" in lines[0]


def test_validate_usage_errors_exit_2(dataset, protein_cli):
    result = protein_cli("validate", "--data", str(dataset), "--drift-alpha", "2")
    assert result.returncode == 2 and "drift_alpha" in result.stderr and "Traceback" not in result.stderr
