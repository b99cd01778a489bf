"""Bad option values are refused before any work, as one line naming the option, with exit 2: a
negative or NaN age never makes gc collect live work, a bad --out never leaves a half-published
submission, and no option value surfaces as a traceback or another verb's error."""

from __future__ import annotations

from pathlib import Path

import pytest

from protein.pipeline.prediction import publish_submission
from protein.registry import Registry
from protein.storage import LocalStore, open_store


def only_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if " INFO " not in line and " WARNING " not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- models gc: ages -------------------------------------------------------------------------------------


@pytest.fixture
def live_store(tmp_path: Path) -> LocalStore:
    """A registration in progress and a run writing checkpoints, both seconds old."""
    store = LocalStore(tmp_path / "store")
    store.put_bytes("models/in-progress/model.safetensors", b"weights being uploaded")
    store.put_bytes("runs/live-run/checkpoint.pt", b"epoch 1")
    return store


@pytest.mark.parametrize(("options", "named"), [
    (["--older-than-hours", "-1"], "--older-than-hours"),
    (["--older-than-hours", "nan"], "--older-than-hours"),
    (["--older-than-hours", "inf"], "--older-than-hours"),
    (["--runs", "--run-min-age-hours", "-1", "--run-age-days", "-1"], "--run-age-days"),
    (["--runs", "--run-age-days", "nan"], "--run-age-days"),
    (["--runs", "--run-min-age-hours", "nan"], "--run-min-age-hours"),
])
def test_gc_refuses_ages_that_are_not_finite_and_non_negative(live_store: LocalStore, protein_cli,
                                                              options: list[str], named: str) -> None:
    before = live_store.list()
    result = protein_cli("models", "gc", "--store", live_store.uri, *options)
    assert result.returncode == 2
    assert only_line(result.stderr).startswith(f"protein models: error: {named} must be a finite number >= 0, got ")
    assert live_store.list() == before  # nothing was deleted


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"older_than_s": -1.0}, "--older-than-hours"),
    ({"older_than_s": float("nan")}, "--older-than-hours"),
    ({"runs": True, "run_age_s": -86400.0}, "--run-age-days"),
    ({"runs": True, "run_min_age_s": float("nan")}, "--run-min-age-hours"),
])
def test_plan_gc_refuses_a_cutoff_in_the_future(live_store: LocalStore, kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=f"^{option} must be a finite number >= 0"):
        Registry(live_store).plan_gc(**kwargs)


def test_gc_with_zero_ages_still_keeps_nothing_it_should_not(live_store: LocalStore) -> None:
    plan = Registry(live_store).plan_gc(older_than_s=0.0, runs=True, run_age_s=0.0, run_min_age_s=0.0)
    assert "in-progress" in plan.orphans  # zero is a valid age: "anything not written in the future"


# --- predict --out, train --device / --run-id, link --hours ------------------------------------------------


@pytest.mark.parametrize("where", ["a folder", "under a file"])
def test_predict_refuses_an_out_path_it_cannot_write_before_any_work(tmp_path: Path, protein_cli,
                                                                     where: str) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path if where == "a folder" else tmp_path / "afile" / "sub.csv"
    store = tmp_path / "store"
    result = protein_cli("predict", "--data", str(tmp_path / "no-such-data"), "--store", str(store),
                         "--model", "no-such-version", "--out", str(out))
    assert result.returncode == 2
    assert only_line(result.stderr).startswith(f"protein predict: error: --out {out}: ")
    assert not store.exists()


def test_the_local_copy_is_written_before_the_submission_is_published(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"))
    with pytest.raises(IsADirectoryError):
        publish_submission(store, "v1", b"Image,Label\n1,0\n", "fp", out=tmp_path)
    assert store.list("submissions/") == []  # neither the CSV nor latest.json points anyone at it


def test_an_unexpected_os_error_is_one_line_naming_the_path(monkeypatch: pytest.MonkeyPatch, protein_cli,
                                                             tmp_path: Path) -> None:
    import protein.pipeline

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", "/srv/out/sub.csv")

    monkeypatch.setattr(protein.pipeline, "predict_and_publish", refuse)
    result = protein_cli("predict", "--data", str(tmp_path), "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert only_line(result.stderr) == "protein predict: error: /srv/out/sub.csv: Permission denied"


@pytest.mark.parametrize(("options", "option"), [
    (["--device", "gpu7"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--run-id", "../x"], "--run-id"),
])
def test_train_refuses_bad_options_as_usage_errors(tmp_path: Path, protein_cli, options: list[str],
                                                   option: str) -> None:
    store = tmp_path / "store"
    result = protein_cli("train", "--data", str(tmp_path / "no-such-data"), "--store", str(store), *options)
    assert result.returncode == 2
    assert only_line(result.stderr).startswith(f"protein train: error: {option} ")
    assert not store.exists()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:3", "mps"])
def test_train_accepts_the_devices_it_documents(device: str) -> None:
    from protein.cli.train_commands import check_device

    assert check_device(device) == device


@pytest.mark.parametrize("hours", ["nan", "inf", "-inf"])
def test_link_names_hours_when_it_is_not_a_number_of_hours(tmp_path: Path, protein_cli, hours: str) -> None:
    result = protein_cli("link", str(tmp_path / "x"), f"--hours={hours}")
    assert result.returncode == 2
    assert only_line(result.stderr) == (f"protein link: error: --hours expects a finite number of hours "
                                        f"(at most 168, 7 days), got {float(hours)}")


# --- a misspelled s3:// URI -------------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["s3:/bucket/p", "s3:bucket/p", "s3//bucket/p", "S3:/bucket/p", "S3://bucket/p"])
def test_a_misspelled_s3_uri_is_refused_not_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], uri: str) -> None:
    # Each opened a LocalStore under the working directory; commands wrote there and exited 0.
    from protein.cli import main
    from protein.data import open_dataset
    from protein.errors import DataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="expected s3://bucket/prefix"):
        open_store(uri)
    with pytest.raises(DataError, match="expected s3://bucket/prefix/"):
        open_dataset(uri)
    assert main(["models", "list", "--store", uri]) == 2
    assert "expected s3://bucket/prefix" in only_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
