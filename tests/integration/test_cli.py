"""The `protein` command as users run it: real processes, exit codes, one-line errors."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers import write_dataset

pytestmark = pytest.mark.integration


def protein(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "protein.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


@pytest.fixture
def dataset(tmp_path):
    labels = {str(i): ["0", "4", "6 4", "2 5"][i % 4] for i in range(24)}
    return write_dataset(tmp_path / "ds", labels, ["900", "901", "902"], size=40)


def test_help_for_every_verb():
    for verb in ("synth", "validate", "train", "evaluate", "predict", "models", "datasets", "cache"):
        result = protein(verb, "--help")
        assert result.returncode == 0 and "usage: protein" in result.stdout, verb


def test_train_evaluate_predict_and_models_local(dataset, tmp_path):
    store, cache = str(tmp_path / "store"), str(tmp_path / "cache")
    train = protein("train", "--data", str(dataset), "--store", store, "--cache-dir", cache, "--epochs", "1",
                    "--image-size", "32", "--batch-size", "8")
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout.strip().splitlines()[-1])
    assert {"model_id", "path", "metrics"} <= set(result)
    model_id = result["model_id"]

    evaluate = protein("evaluate", "--data", str(dataset), "--store", store, "--cache-dir", cache, "--model", model_id)
    assert evaluate.returncode == 0, evaluate.stderr
    assert "f1_samples" in json.loads(evaluate.stdout)

    validate = protein("validate", "--data", str(dataset), "--store", store, "--image-size", "40")
    assert validate.returncode == 0, validate.stderr
    assert json.loads(validate.stdout)["reference"]["source"].startswith("real train.csv")
    promote = protein("models", "promote", model_id, "--store", store)
    assert promote.returncode == 0, promote.stderr
    # The champion's training data is now what drift is measured against.
    reference = json.loads((tmp_path / "store" / "validation" / "reference_profile.json").read_text())
    assert reference["model_id"] == model_id and reference["n"] == 24
    assert json.loads(promote.stdout)["reference_profile"]["hash"] == reference["hash"]
    listing = json.loads(protein("models", "list", "--json", "--store", store).stdout)
    assert [(row["id"], row["champion"]) for row in listing] == [(model_id, True)]
    assert {"id", "created", "champion", "metrics"} <= set(listing[0])

    out = tmp_path / "submission.csv"
    predict = protein("predict", "--data", str(dataset), "--store", store, "--cache-dir", cache, "--out", str(out))
    assert predict.returncode == 0, predict.stderr
    lines = out.read_text().splitlines()
    assert lines[0] == "Image,Label" and [line.split(",")[0] for line in lines[1:]] == ["900", "901", "902"]


@pytest.mark.parametrize("mutate,needle", [
    (lambda d: (d / "train.csv").unlink(), "train.csv: file not found"),
    (lambda d: (d / "train.csv").write_text("Image,Labels\n1,0\n"), "missing column(s) Label"),
    (lambda d: (d / "train.csv").write_text("Image,Label\n0,1\n1,11\n"), "line 3 (Image '1'): expected class ids 0-9"),
    (lambda d: (d / "train" / "5.png").unlink(), "train/5.png: file not found"),
    (lambda d: (d / "train" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage"), "train/5.png: not an image"),
])
def test_bad_input_one_line_error_exit_2_nothing_written(dataset, tmp_path, mutate, needle):
    mutate(dataset)
    store = tmp_path / "store"
    result = protein("train", "--data", str(dataset), "--store", str(store), "--cache-dir", str(tmp_path / "c"),
                     "--epochs", "1", "--image-size", "32")
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert not (store / "models").exists()
    cache_files = list((tmp_path / "c").glob("*")) if (tmp_path / "c").exists() else []
    assert not [f for f in cache_files if f.suffix == ".npy"], "no half-built cache may remain"


def test_unknown_model_exit_4_lists_versions(dataset, tmp_path):
    result = protein("predict", "--data", str(dataset), "--store", str(tmp_path / "store"), "--model", "nope")
    assert result.returncode == 4 and "unknown model version 'nope'" in result.stderr


def test_bad_option_value_is_a_usage_error(dataset, tmp_path):
    result = protein("train", "--data", str(dataset), "--store", str(tmp_path), "--image-size", "4")
    assert result.returncode == 2 and "image_size must be 16-1024" in result.stderr


def test_s3_missing_bucket_and_unreachable_endpoint(s3_env, dataset, tmp_path):
    secret = {"AWS_SECRET_ACCESS_KEY": "SECRETfake1234567890"}
    missing = protein("models", "list", "--store", "s3://no-such-bucket/x", env=secret)
    assert missing.returncode == 3
    assert "s3://no-such-bucket/x" in missing.stderr and "does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr and "SECRETfake" not in missing.stderr + missing.stdout

    from tests.conftest import free_port

    closed = {**secret, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    unreachable = protein("train", "--data", str(dataset), "--store", "s3://bucket/x", env=closed)
    assert unreachable.returncode == 3 and "cannot reach" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_models_list_on_s3_marks_the_champion(s3_bucket, dataset, tmp_path):
    cache = str(tmp_path / "cache")
    train = protein("train", "--data", str(dataset), "--store", s3_bucket, "--cache-dir", cache, "--epochs", "1",
                    "--image-size", "32", "--batch-size", "8")
    assert train.returncode == 0, train.stderr
    model_id = json.loads(train.stdout.strip().splitlines()[-1])["model_id"]
    assert protein("models", "promote", model_id, "--store", s3_bucket).returncode == 0
    listing = protein("models", "list", "--store", s3_bucket)
    assert listing.returncode == 0
    assert listing.stdout.startswith(f"* {model_id}")


def test_validate_leakage_exits_1_naming_both_files(dataset, tmp_path):
    import shutil

    shutil.copy(dataset / "train" / "3.png", dataset / "test" / "901.png")  # a train image reused as a test image
    result = protein("validate", "--data", str(dataset), "--image-size", "40", "--report", str(tmp_path / "r"),
                     "--store", str(tmp_path / "store"))
    assert result.returncode == 1
    logged = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z]+ ")  # log lines, not findings
    # Warnings and skipped checks are named on lines of their own; one line per failure.
    lines = [line for line in result.stderr.strip().splitlines()
             if not logged.match(line) and not line.startswith(("warning: ", "not checked: "))]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "expect_no_content_overlap_between_splits" in lines[0]
    assert "test/901.png" in lines[0] and "train/3.png" in lines[0]


def test_validate_usage_errors_exit_2(dataset):
    result = protein("validate", "--data", str(dataset), "--drift-alpha", "2")
    assert result.returncode == 2 and "drift_alpha" in result.stderr and "Traceback" not in result.stderr
