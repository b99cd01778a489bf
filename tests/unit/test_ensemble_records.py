"""An ensemble reads each member's model.json before any member is loaded: its thresholds, its fold
plan and the object its holdout probabilities are in. A record without them, or naming another
run's object, was a KeyError or numpy traceback (exit 1) naming no version; it is one RecordError line
naming the version's model.json (exit 8)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protein.errors import RecordError
from protein.labels import LABELS
from protein.modeling.ensemble import holdout_probs_key
from protein.pipeline.prediction import predict_test_set
from protein.registry import Registry
from protein.storage import LocalStore
from tests.helpers import write_dataset

TRAIN = {f"r{i}": str(i % len(LABELS)) for i in range(8)}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "data", TRAIN, ["t0", "t1"], size=8)


@pytest.fixture
def data_fingerprint(data: Path) -> str:
    from protein.data import fingerprint, open_dataset

    return fingerprint(open_dataset(data))


def fold_spec(run_id: str, fold: int, **replaced: Any) -> dict[str, Any]:
    """model.json of fold `fold` of 2, as training writes it (protein.pipeline.training)."""
    spec: dict[str, Any] = {
        "arch": "resnet18", "image_size": 8, "class_names": list(LABELS),
        "normalization": {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.2, 0.2]},
        "thresholds": [0.5] * len(LABELS), "run_id": run_id, "data_fingerprint": None,
        "holdout": {"fold": fold, "folds": 2, "seed": 0, "probs_key": holdout_probs_key(run_id)},
    }
    return {**spec, **replaced}


def register(store: LocalStore, tmp_path: Path, spec: dict[str, Any], rows: list[str]) -> str:
    weights = tmp_path / f"{spec['run_id']}.safetensors"
    weights.write_bytes(spec["run_id"].encode())
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=np.asarray(rows, dtype=str), probs=np.full((len(rows), len(LABELS)), 0.5, np.float32))
    store.put_bytes(holdout_probs_key(spec["run_id"]), buffer.getvalue())
    return Registry(store).register(weights, spec)


def refusal(data: Path, store: LocalStore, versions: list[str]) -> str:
    with pytest.raises(RecordError) as refused:
        predict_test_set(data, store.uri, versions, cache_dir=store.root.parent / "cache")
    message = str(refused.value)
    assert "\n" not in message
    return message


def folds(store: LocalStore, tmp_path: Path, second: dict[str, Any], data_fingerprint: str) -> list[str]:
    """Two folds of the data predicted, the second as given."""
    first = fold_spec("run-a", 1, data_fingerprint=data_fingerprint)
    return [register(store, tmp_path, first, ["r0", "r1", "r2", "r3"]),
            register(store, tmp_path, {**second, "data_fingerprint": data_fingerprint}, ["r4", "r5", "r6", "r7"])]


def test_a_member_without_thresholds_is_named(data: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    plain = fold_spec("run-a", 1, holdout=None)
    versions = [register(store, tmp_path, plain, []),
                register(store, tmp_path, {k: v for k, v in fold_spec("run-b", 2, holdout=None).items()
                                           if k != "thresholds"}, [])]
    assert f"models/{versions[1]}/model.json: thresholds must be {len(LABELS)} numbers" in refusal(data, store,
                                                                                                    versions)


def test_members_with_thresholds_of_other_lengths_are_named(data: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    versions = [register(store, tmp_path, fold_spec("run-a", 1, holdout=None), []),
                register(store, tmp_path, fold_spec("run-b", 2, holdout=None, thresholds=[0.5] * 3), [])]
    assert f"models/{versions[1]}/model.json: thresholds must be" in refusal(data, store, versions)


@pytest.mark.parametrize("field", ["seed", "folds"])
def test_a_fold_model_without_its_plan_is_named(data: Path, tmp_path: Path, data_fingerprint: str, field: str) -> None:
    store = LocalStore(tmp_path / "store")
    second = fold_spec("run-b", 2)
    second["holdout"] = {k: v for k, v in second["holdout"].items() if k != field}
    versions = folds(store, tmp_path, second, data_fingerprint)
    assert f"models/{versions[1]}/model.json: holdout.{field} must be" in refusal(data, store, versions)


def test_a_probs_key_of_another_run_is_refused(data: Path, tmp_path: Path, data_fingerprint: str) -> None:
    store = LocalStore(tmp_path / "store")
    second = fold_spec("run-b", 2)
    second["holdout"] = {**second["holdout"], "probs_key": "registry/champion.json"}
    versions = folds(store, tmp_path, second, data_fingerprint)
    message = refusal(data, store, versions)
    assert f"models/{versions[1]}/model.json: holdout.probs_key" in message and "runs/run-b/" in message


def test_holdout_probs_larger_than_the_data_takes_are_not_read(data: Path, tmp_path: Path,
                                                               data_fingerprint: str) -> None:
    store = LocalStore(tmp_path / "store")
    versions = folds(store, tmp_path, fold_spec("run-b", 2), data_fingerprint)
    store.put_bytes(holdout_probs_key("run-b"), b"\0" * 10_000_000)
    message = refusal(data, store, versions)
    assert "larger than the" in message and "runs/run-b/holdout_probs.npz" in message


def test_holdout_probs_not_of_the_saved_shape_are_named(data: Path, tmp_path: Path, data_fingerprint: str) -> None:
    store = LocalStore(tmp_path / "store")
    versions = folds(store, tmp_path, fold_spec("run-b", 2), data_fingerprint)
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=np.asarray(["r4"]), probs=np.zeros((1, 3), np.float32))
    store.put_bytes(holdout_probs_key("run-b"), buffer.getvalue())
    assert f"model {versions[1]}: holdout probabilities: probs of shape (1, 3)" in refusal(data, store, versions)


def test_honest_fold_records_tune_out_of_fold_thresholds(data: Path, tmp_path: Path) -> None:
    from protein.data import fingerprint, load_competition
    from protein.modeling.ensemble import ensemble_thresholds

    competition = load_competition(data, cache_dir=tmp_path / "c")
    fp = fingerprint(competition.source)
    store = LocalStore(tmp_path / "store")
    versions = [register(store, tmp_path, fold_spec("run-a", 1, data_fingerprint=fp), ["r0", "r1", "r2", "r3"]),
                register(store, tmp_path, fold_spec("run-b", 2, data_fingerprint=fp), ["r4", "r5", "r6", "r7"])]
    thresholds, info = ensemble_thresholds(Registry(store), versions, competition, fp)
    assert info["source"] == "out-of-fold" and info["n_rows"] == len(TRAIN) and thresholds.shape == (len(LABELS),)


def with_holdout(spec: dict[str, Any], **holdout: Any) -> dict[str, Any]:
    return {**spec, "holdout": {**spec["holdout"], **holdout}}


@pytest.mark.parametrize("case", ["one fold of two architectures", "two seeds", "two pushes"])
def test_fold_models_not_of_one_split_fall_back_to_the_mean_of_their_thresholds(data: Path, tmp_path: Path,
                                                                                case: str) -> None:
    """Documented: anything but the distinct folds of one split uses the members' mean threshold.
    These were a RegistryError (exit 4) from out_of_fold_thresholds: no ensemble at all."""
    from protein.data import fingerprint, load_competition
    from protein.modeling.ensemble import ensemble_thresholds

    competition = load_competition(data, cache_dir=tmp_path / "c")
    fp = fingerprint(competition.source)
    first = fold_spec("run-a", 1, data_fingerprint=fp, thresholds=[0.2] * len(LABELS))
    second = fold_spec("run-b", 2, data_fingerprint=fp, thresholds=[0.4] * len(LABELS))
    rows = ["r4", "r5", "r6", "r7"]
    if case == "one fold of two architectures":
        second, rows = with_holdout({**second, "arch": "efficientnet_b0"}, fold=1), ["r0", "r1", "r2", "r3"]
    elif case == "two seeds":
        second = with_holdout(second, seed=1)
    else:
        first = {**first, "data_fingerprint": "0123456789abcdef"}
    store = LocalStore(tmp_path / "store")
    versions = [register(store, tmp_path, first, ["r0", "r1", "r2", "r3"]), register(store, tmp_path, second, rows)]
    thresholds, info = ensemble_thresholds(Registry(store), versions, competition, fp)
    assert info["source"].startswith("mean of the members' thresholds (not the distinct folds of one K-fold split"), \
        info["source"]
    assert thresholds == pytest.approx([0.3] * len(LABELS))


class FakePredictor:
    """What predict_test_set asks of a member, without weights."""

    image_size = 8

    def predict_probs(self, images: Any) -> np.ndarray:
        return np.full((len(images), len(LABELS)), 0.6, np.float32)


def test_folds_of_other_data_fall_back_to_the_members_thresholds(data: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The folds' out-of-fold probabilities are of the old data's rows: tuned against this data's labels under
    # the same ids, the thresholds were fitted to labels those probabilities never saw.
    import protein.pipeline.prediction as prediction

    monkeypatch.setattr(prediction, "load_predictor", lambda *args, **kwargs: FakePredictor())
    store = LocalStore(tmp_path / "store")
    old = "0123456789abcdef"
    versions = [register(store, tmp_path, fold_spec("run-a", 1, data_fingerprint=old, thresholds=[0.2] * len(LABELS)),
                         ["r0", "r1", "r2", "r3"]),
                register(store, tmp_path, fold_spec("run-b", 2, data_fingerprint=old, thresholds=[0.4] * len(LABELS)),
                         ["r4", "r5", "r6", "r7"])]
    result = predict_test_set(data, store.uri, versions, cache_dir=tmp_path / "cache")
    source = result.extra["thresholds_from"]["source"]
    assert source.startswith("mean of the members' thresholds (the folds were trained on data 0123456789abcdef, "
                             f"not the data predicted ({result.data_fingerprint})"), source
    assert result.extra["thresholds"] == pytest.approx([0.3] * len(LABELS))


@pytest.mark.parametrize("named", [["champion", "self"], ["self", "self"]])
def test_a_version_named_twice_is_bad_input_that_is_not_retried(data: Path, tmp_path: Path, named: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m flows.predict --model <champion id> champion` was a ValueError: the predict task
    retried it (5 s, 30 s), then the command exited 1, not 2."""
    import protein.pipeline.prediction as prediction
    from protein.errors import ProteinError
    from tasks.retry import is_transient

    monkeypatch.setattr(prediction, "load_competition", lambda *args, **kwargs: pytest.fail("read the data"))
    store = LocalStore(tmp_path / "store")
    version = register(store, tmp_path, fold_spec("run-a", 1), ["r0", "r1", "r2", "r3"])
    Registry(store).promote(version)
    requested = [version if name == "self" else name for name in named]
    with pytest.raises(ProteinError) as refused:
        predict_test_set(data, store.uri, requested, cache_dir=tmp_path / "cache")
    assert refused.value.exit_code == 2 and not is_transient(refused.value)
    assert str(refused.value).startswith(f"the models {requested} name version {version} twice"), refused.value


def refit_folds(store: LocalStore, tmp_path: Path, data_fingerprint: str, **trained: Any) -> list[str]:
    """Two fold models of the data whose model.json records the TrainConfig they were trained with."""
    from protein.config import TrainConfig, to_dict

    return [register(store, tmp_path, fold_spec(f"run-{fold}", fold, data_fingerprint=data_fingerprint,
                                                train_config=to_dict(TrainConfig(fold=fold, folds=2, **trained))),
                     rows)
            for fold, rows in ((1, ["r0", "r1", "r2", "r3"]), (2, ["r4", "r5", "r6", "r7"]))]


def test_a_refit_of_folds_trained_otherwise_is_refused_before_training(data: Path, tmp_path: Path,
                                                                       data_fingerprint: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Folds trained without TTA refit with it: the refit shipped thresholds tuned on the folds'
    single-view probabilities and reported the folds' scores as its own."""
    import protein.pipeline.training as training
    from protein.config import TrainConfig
    from protein.errors import RegistryError

    monkeypatch.setattr(training, "fit", lambda *args, **kwargs: pytest.fail("trained"))
    store = LocalStore(tmp_path / "store")
    versions = refit_folds(store, tmp_path, data_fingerprint, image_size=16, device="cpu")
    before = set(Registry(store).versions())
    config = TrainConfig(image_size=16, device="cpu", refit=True, thresholds_from=tuple(versions), tta=True)
    with pytest.raises(RegistryError) as refused:
        training.train_and_register(data, store.uri, config, cache_dir=tmp_path / "cache")
    message = str(refused.value)
    assert refused.value.exit_code == 4 and "\n" not in message
    assert message.startswith(f"fold model {versions[0]} was trained otherwise than this refit (tta: fold False, "
                              "refit True)"), message
    assert set(Registry(store).versions()) == before


def test_a_refit_may_differ_from_its_folds_only_where_the_model_does_not(tmp_path: Path,
                                                                         data_fingerprint: str) -> None:
    from protein.config import TrainConfig
    from protein.errors import RegistryError
    from protein.modeling.ensemble import check_refit_matches_folds

    store = LocalStore(tmp_path / "store")
    versions = refit_folds(store, tmp_path, data_fingerprint, image_size=16, tta=True)
    registry = Registry(store)
    same_model = TrainConfig(image_size=16, tta=True, refit=True, thresholds_from=tuple(versions), folds=5, seed=7,
                             device="cpu", accumulate=2, compile=True, threshold_metric="f1_macro")
    check_refit_matches_folds(registry, same_model)
    for changed in ({"arch": "efficientnet_b0"}, {"image_size": 32}, {"epochs": 9}, {"weights": "imagenet"}):
        config = TrainConfig(**{"image_size": 16, "tta": True, **changed}, refit=True, thresholds_from=tuple(versions))
        with pytest.raises(RegistryError, match=f"\\({next(iter(changed))}: fold "):
            check_refit_matches_folds(registry, config)
