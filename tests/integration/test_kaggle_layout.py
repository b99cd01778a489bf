"""The competition download exactly as Kaggle ships it ('Human protein atlas/' + submission.csv above),
as a folder, a zip and under an s3:// prefix, through validate, train and predict as users run them;
and training that refuses data whose fingerprint is not the validated one."""

import json

import boto3
import pytest

from protein.cli import main as protein_main
from protein.data import fingerprint, open_dataset
from tests.helpers import TINY_ARCH, write_kaggle_dataset, zip_folder

pytestmark = pytest.mark.integration

LABELS = {str(100 + i): ["0", "4", "6 4", "2 5", "9"][i % 5] for i in range(20)}
TEST_IDS = ["907", "903", "905"]


@pytest.fixture
def protein(capsys):
    """The CLI in this process (torch and GX imported once): (exit code, last JSON line or None, stderr)."""

    def run(*args):
        code = protein_main(list(args))
        captured = capsys.readouterr()
        lines = captured.out.strip().splitlines()
        return code, json.loads(lines[-1]) if code == 0 and lines else None, captured.err

    return run


@pytest.fixture
def kaggle(tmp_path):
    return write_kaggle_dataset(tmp_path / "jovian-pytorch-z2g", LABELS, TEST_IDS, size=32)


@pytest.mark.parametrize("form", ["folder", "zip", "s3"])
def test_kaggle_download_validates_trains_and_predicts(kaggle, tmp_path, form, request, protein, monkeypatch):
    if form == "folder":
        data = str(kaggle)
    elif form == "zip":
        data = str(zip_folder(kaggle, tmp_path / "jovian-pytorch-z2g.zip"))
    else:
        bucket = request.getfixturevalue("s3_bucket").removeprefix("s3://").split("/")[0]
        client = boto3.client("s3")
        for path in kaggle.rglob("*"):
            if path.is_file():
                client.upload_file(str(path), bucket, "z2g/" + path.relative_to(kaggle).as_posix())
        data = f"s3://{bucket}/z2g/"
    store, cache = str(tmp_path / "store"), str(tmp_path / "cache")
    monkeypatch.setenv("PROTEIN_CACHE_DIR", cache)
    expected_fp = fingerprint(open_dataset(kaggle, cache_dir=tmp_path / "cache-local"))

    code, report, err = protein("validate", "--data", data, "--store", store, "--image-size", "32",
                                "--drift-action", "warn")
    assert code == 0, err[-2000:]
    assert report["success"] and report["data_fingerprint"] == expected_fp

    code, model, err = protein("train", "--data", data, "--store", store, "--cache-dir", cache, "--epochs", "1",
                               "--image-size", "32", "--batch-size", "8", "--arch", TINY_ARCH,
                               "--expect-fingerprint", report["data_fingerprint"])
    assert code == 0, err[-2000:]
    assert model["data_fingerprint"] == expected_fp

    out = tmp_path / "submission.csv"
    code, _, err = protein("predict", "--data", data, "--store", store, "--cache-dir", cache, "--model",
                           model["model_id"], "--out", str(out))
    assert code == 0, err[-2000:]
    rows = out.read_text().splitlines()
    assert rows[0] == "Image,Label" and [r.split(",")[0] for r in rows[1:]] == TEST_IDS  # template order


def test_training_refuses_data_that_is_not_the_validated_data(kaggle, tmp_path, protein):
    from protein.config import TrainConfig
    from protein.errors import FingerprintMismatch
    from protein.pipeline import train_and_register

    validated = fingerprint(open_dataset(kaggle, cache_dir=tmp_path / "cache"))
    (kaggle / "Human protein atlas" / "train" / "100.png").write_bytes(
        (kaggle / "Human protein atlas" / "train" / "101.png").read_bytes())  # changed after validation
    store = tmp_path / "store"
    with pytest.raises(FingerprintMismatch, match=rf"data fingerprint [0-9a-f]{{16}} differs from the expected "
                                                  rf"{validated} \(the data changed since it was validated\)"):
        train_and_register(str(kaggle), str(store), TrainConfig(epochs=1, image_size=32), cache_dir=tmp_path / "cache",
                           expected_fingerprint=validated)
    assert not (store / "models").exists()  # nothing trained, nothing registered

    code, _, err = protein("train", "--data", str(kaggle), "--store", str(store), "--cache-dir",
                           str(tmp_path / "cache"), "--epochs", "1", "--image-size", "32",
                           "--expect-fingerprint", validated)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith(f"protein train: error: {kaggle}/Human protein atlas: "
                                                   "data fingerprint ")


def test_train_flow_fails_at_once_on_an_unexpected_fingerprint(prefect_harness, kaggle, tmp_path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.params import TrainParams
    from flows.train import train

    monkeypatch.setenv("PROTEIN_CACHE_DIR", str(tmp_path / "cache"))
    state = train(data=str(kaggle), run_id="r-expect", store=str(tmp_path / "store"),
                  train=TrainParams(epochs=1, image_size=32, batch_size=8), expected_fingerprint="0" * 16,
                  return_state=True)
    assert state.is_failed()
    assert "differs from the expected 0000000000000000" in str(state.result(raise_on_failure=False))
    with get_client(sync_client=True) as client:
        this_run = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        runs = client.read_task_runs(flow_run_filter=this_run)
    assert [(r.name.split("-")[0], r.run_count) for r in runs] == [("train", 1)]  # not retried: the data stays changed
    assert not (tmp_path / "store" / "models").exists()
