"""The gate scores a challenger on rows this run chose, not rows its trainer declared
(protein.pipeline.evaluation.check_declared_split), and rebuilds an older version's split the way
it was made (recorded_split: folds and refits)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from protein.config import TrainConfig, to_dict
from protein.errors import EvidenceRefused
from protein.pipeline.evaluation import check_declared_lineage, check_declared_split, recorded_split
from protein.pipeline.inputs import holdout_split, training_split


@pytest.fixture
def data() -> Any:
    rng = np.random.default_rng(7)
    targets = (rng.random((60, 10)) < 0.3).astype(np.float32)
    targets[targets.sum(axis=1) == 0, 4] = 1.0  # every image has a label, as in train.csv
    return SimpleNamespace(train_ids=[f"img{i:03d}" for i in range(60)], targets=targets,
                           train_image_digests=dict)  # no image bytes: no copies


def spec_of(data: Any, config: TrainConfig) -> dict[str, Any]:
    """model.json's split, as an honest trainer writes it (protein.pipeline.training)."""
    train_idx, holdout_idx = training_split(data, config)
    return {"training_rows": {"ids": [data.train_ids[i] for i in train_idx]},
            "holdout": {"ids": [data.train_ids[i] for i in holdout_idx]}}


@pytest.mark.parametrize("config", [TrainConfig(), TrainConfig(seed=3, holdout_fraction=0.3),
                                    TrainConfig(fold=2, folds=4),
                                    TrainConfig(refit=True, thresholds_from=("m-1", "m-2"))],
                         ids=["default", "fraction-seed", "fold", "refit"])
def test_the_split_the_run_asked_for_is_accepted(data: Any, config: TrainConfig):
    check_declared_split(spec_of(data, config), data, config, "challenger m-1")


def test_a_holdout_the_trainer_trained_on_is_refused(data: Any):
    config = TrainConfig()
    spec = spec_of(data, config)
    spec["holdout"]["ids"] = list(spec["training_rows"]["ids"])  # graded on rows it learned
    with pytest.raises(EvidenceRefused, match=r"challenger m-1: its model.json declares holdout \(48 ids\) other "
                                              r"than the split this run asked for \(12 ids"):
        check_declared_split(spec, data, config, "challenger m-1")


def test_training_rows_other_than_asked_are_refused(data: Any):
    config = TrainConfig()
    spec = spec_of(data, config)
    spec["training_rows"]["ids"] = data.train_ids  # the holdout declared right, trained on every row
    with pytest.raises(EvidenceRefused, match="declares training_rows"):
        check_declared_split(spec, data, config, "challenger m-1")


def test_a_split_of_other_parameters_is_refused(data: Any):
    with pytest.raises(EvidenceRefused, match="seed=0"):
        check_declared_split(spec_of(data, TrainConfig(seed=1)), data, TrainConfig(), "challenger m-1")


def test_a_model_json_without_id_lists_is_refused(data: Any):
    with pytest.raises(EvidenceRefused, match="no id list"):
        check_declared_split({"holdout": {"fraction": 0.2, "seed": 0}}, data, TrainConfig(), "challenger m-1")


def test_an_older_fold_version_is_rebuilt_from_its_fold(data: Any):
    spec = {"data_fingerprint": "f" * 64, "holdout": {"fraction": 0.2, "seed": 1, "fold": 3, "folds": 4}}
    train_idx, holdout_idx = holdout_split(data, 0.2, 1, 3, 4)
    assert recorded_split(spec, data, "f" * 64) == ([data.train_ids[i] for i in train_idx],
                                                    [data.train_ids[i] for i in holdout_idx])
    assert holdout_split(data, 0.2, 1)[1].tolist() != holdout_idx.tolist()  # the fraction split differs


def test_an_older_refit_version_trained_on_every_row(data: Any):
    spec = {"data_fingerprint": "f" * 64, "refit": True, "holdout": {"fraction": None, "seed": 0}}
    assert recorded_split(spec, data, "f" * 64) == (data.train_ids, [])
    assert recorded_split({**spec, "refit": False}, data, "f" * 64) is None  # unknowable, not guessed


def honest_lineage(data: Any, config: TrainConfig, fingerprint: str) -> dict[str, Any]:
    """What an honest trainer records of what it trained on (protein.pipeline.training)."""
    from protein.pipeline.training import training_label_profile

    return {"data_fingerprint": fingerprint, "train_config": to_dict(config),
            "label_profile": json.loads(json.dumps(training_label_profile(data.train_label_sets)))}


@pytest.mark.parametrize(("forged", "named"), [
    ({"data_fingerprint": "0" * 16}, "says it trained on data '0000000000000000'"),
    ({"data_fingerprint": None}, "says it trained on data None"),
    ({"train_config": {**to_dict(TrainConfig()), "epochs": 99}}, "records another training config"),
    ({"train_config": "resnet18"}, "records another training config"),
    ({"label_profile": {"hash": "forged"}}, "records another label profile"),
], ids=["other-data", "no-data", "other-config", "config-not-a-dict", "other-profile"])
def test_a_challenger_claiming_other_data_config_or_profile_is_refused(data: Any, forged: dict[str, Any],
                                                                       named: str):
    """The GPU host writes model.json; once the version serves, its fingerprint places it in push order
    and keys the gate's judgement of that data, and its profile becomes the drift reference."""
    data.train_label_sets = [frozenset(np.flatnonzero(row).tolist()) for row in data.targets]
    fingerprint = "ab" * 8
    honest = honest_lineage(data, TrainConfig(), fingerprint)
    check_declared_lineage({**honest, "train_config": {**honest["train_config"], "device": "cuda"}}, data,
                           fingerprint, TrainConfig(), "challenger m-1")  # where it trained is not what
    with pytest.raises(EvidenceRefused, match=f"challenger m-1: its model.json {named}"):
        check_declared_lineage({**honest, **forged}, data, fingerprint, TrainConfig(), "challenger m-1")


def test_a_split_part_that_is_not_an_object_is_refused_in_one_line(data: Any):
    spec = {**spec_of(data, TrainConfig()), "training_rows": ["img001", "img002"]}  # an AttributeError traceback
    with pytest.raises(EvidenceRefused, match=r"declares training_rows \(no id list\)"):
        check_declared_split(spec, data, TrainConfig(), "challenger m-1")


def register_challenger(tmp_path: Path, lie: dict[str, Any]) -> tuple[Path, str, str, str]:
    """A dataset, and a store holding a challenger registered by a GPU host whose model.json is
    honest but for ``lie``: (dataset, store URI, version, the fingerprint this run validated)."""
    from protein.data.tables import load_competition
    from protein.registry import Registry
    from protein.storage import open_store
    from tests.helpers import write_dataset

    dataset = write_dataset(tmp_path / "ds", {f"img{i:03d}": f"{i % 10} {(i + 3) % 10}" for i in range(30)},
                            ["t1"], size=16)
    data, config, fingerprint = load_competition(dataset, require_test=False), TrainConfig(), "cd" * 32
    store = str(tmp_path / "store")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    spec = {"arch": "resnet18", "image_size": 128, **honest_lineage(data, config, fingerprint), **spec_of(data, config)}
    if lie.get("holdout") == "training_rows":
        spec["holdout"] = {"ids": list(spec["training_rows"]["ids"])}
    else:
        spec.update(lie)
    version = Registry(open_store(store)).register(weights, spec, version="gpu-host-1")
    return dataset, store, version, fingerprint


LIES = [({"holdout": "training_rows"}, r"challenger gpu-host-1: its model.json declares holdout \(25 ids\)"),
        ({"data_fingerprint": "0" * 64}, "challenger gpu-host-1: its model.json says it trained on data '000")]


@pytest.mark.parametrize(("lie", "refusal"), LIES, ids=["holdout-is-its-training-rows", "other-data"])
def test_a_registered_challenger_whose_model_json_lies_is_refused(tmp_path: Path, lie: dict[str, Any],
                                                                   refusal: str):
    """Where the retrain checks it: the model.json the GPU host registered in the store, read back."""
    from protein.pipeline.evaluation import verify_challenger_split

    dataset, store, version, fingerprint = register_challenger(tmp_path / "honest", {})
    verify_challenger_split(dataset, store, version, TrainConfig(), fingerprint)
    dataset, store, version, fingerprint = register_challenger(tmp_path / "lying", lie)
    with pytest.raises(EvidenceRefused, match=refusal):
        verify_challenger_split(dataset, store, version, TrainConfig(), fingerprint)


@pytest.mark.parametrize(("lie", "refusal"), LIES, ids=["holdout-is-its-training-rows", "other-data"])
def test_the_retrain_refuses_a_challenger_trained_elsewhere_whose_model_json_lies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lie: dict[str, Any], refusal: str):
    """The retrain, its other steps played by stand-ins: the train deployment "registers" a lying
    challenger; the run fails naming it, and nothing is gated or promoted."""
    import logging
    import uuid

    import flows.retrain as retrain
    from protein.registry import Registry
    from protein.storage import open_store
    from tasks.evaluation import check_challenger_split

    dataset, store, version, fingerprint = register_challenger(tmp_path, lie)

    def after_the_refusal(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the lying challenger went on to be gated")

    monkeypatch.setattr(retrain, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(retrain, "flow_run", SimpleNamespace(id=uuid.uuid4(), parameters={}))
    monkeypatch.setattr(retrain, "definition_gate_of_this_run", lambda: None)
    monkeypatch.setattr(retrain, "resolve_dataset", lambda *args: {"uri": str(dataset), "channel": None,
                                                                    "trigger_sequence": None, "fingerprint": None})
    monkeypatch.setattr(retrain, "current_champion", lambda store: None)
    monkeypatch.setattr(retrain, "lost_after_refusal", lambda config: None)
    monkeypatch.setattr(retrain, "check_deployment", lambda name: {"deployment": name, "commit": "1" * 40})
    monkeypatch.setattr(retrain, "validate_data", lambda *args: {"data_fingerprint": fingerprint, "success": True,
                                                                 "report_uri": None, "failures": []})
    monkeypatch.setattr(retrain, "preload", lambda modules: None)
    monkeypatch.setattr(retrain, "dispatch_step", lambda *args: None)
    monkeypatch.setattr(retrain, "find_run_model", lambda store, run_id: version)
    monkeypatch.setattr(retrain, "check_challenger_split", check_challenger_split.fn)  # the task's own body
    for step in ("earlier_gate_decision", "gate_evaluation", "gate", "promote_model", "submission_uri"):
        monkeypatch.setattr(retrain, step, after_the_refusal)
    state = retrain.retrain.fn(data=str(dataset), store=store, train_deployment="train/gpu",
                               score_deployment="score/gpu")
    assert state.is_failed() and state.message is not None and len(state.message.splitlines()) == 1, state
    assert re.match(refusal, state.message), state.message
    assert Registry(open_store(store)).champion().champion is None


def dataset_with_a_copy(tmp_path: Path) -> Any:
    """40 images, then a push's 99999.png: a byte-identical copy of 123.png under a new id."""
    import shutil

    from protein.data.tables import load_competition
    from tests.helpers import write_dataset

    labels = {str(100 + i): f"{i % 10} {(i + 3) % 10}" for i in range(40)}
    dataset = write_dataset(tmp_path / "ds", {**labels, "99999": labels["123"]}, ["t1"], size=16)
    shutil.copyfile(dataset / "train" / "123.png", dataset / "train" / "99999.png")
    return load_competition(dataset, require_test=False)


def test_a_pushed_copy_lands_on_its_originals_side_of_every_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = dataset_with_a_copy(tmp_path)
    row = {image_id: i for i, image_id in enumerate(data.train_ids)}
    calls = []
    digests = data.source.digests
    monkeypatch.setattr(data.source, "digests", lambda: calls.append(1) or digests())
    for seed in range(6):
        for fold in (None, 1, 2, 3):
            _, holdout_idx = holdout_split(data, 0.25, seed, fold, folds=3)
            held_out = set(holdout_idx.tolist())
            assert (row["123"] in held_out) == (row["99999"] in held_out), (seed, fold)
    assert len(calls) == 1  # the fingerprint's digests, looked up once: no image is hashed per split


def test_the_gate_drops_a_row_whose_copy_the_challenger_trained_on(tmp_path: Path):
    """The review's case: 123 was in the champion's holdout; the challenger's model.json says it
    trained on 99999 (123's bytes) and held out 123. 123 is not a row neither model saw."""
    from protein.pipeline.evaluation import gate_rows

    data = dataset_with_a_copy(tmp_path)
    others = [i for i in data.train_ids if i not in ("123", "99999")]
    champion = {"training_rows": {"ids": others[:30]}, "holdout": {"ids": ["123", *others[30:]]}}
    challenger = {"training_rows": {"ids": ["99999", *others[:30]]}, "holdout": {"ids": ["123", *others[30:]]}}
    rows = gate_rows(data, "fp", challenger, champion)
    assert "123" not in rows.ids and rows.copies == 1 and set(rows.ids) == set(others[30:])
    assert "123" not in gate_rows(data, "fp", challenger, None).ids  # the challenger alone, as evaluate does


def test_an_older_version_without_id_lists_counts_a_copy_as_trained_on_by_either_split(tmp_path: Path):
    """Rebuilt from fraction and seed, a version may have been split before copies were kept
    together: a row either split trained on counts as trained on, and the gate keeps no row whose
    bytes it may have trained on."""
    from protein.pipeline.evaluation import gate_rows

    data = dataset_with_a_copy(tmp_path)
    original, copy = data.train_ids.index("123"), data.train_ids.index("99999")
    # A seed whose old split held out 123 and trained on 99999; today's split holds out both.
    seed = next(s for s in range(50) if original in (old := holdout_split(data, 0.25, s, grouped=False)[1].tolist())
                and copy not in old)
    train_idx, holdout_idx = holdout_split(data, 0.25, seed)
    assert copy in holdout_idx.tolist()
    legacy = {"data_fingerprint": "f" * 64, "holdout": {"fraction": 0.25, "seed": seed}}
    train_ids, holdout_ids = recorded_split(legacy, data, "f" * 64)
    assert "99999" in train_ids and "99999" not in holdout_ids
    challenger = {"training_rows": {"ids": [data.train_ids[i] for i in train_idx]},
                  "holdout": {"ids": [data.train_ids[i] for i in holdout_idx]}}
    rows = gate_rows(data, "f" * 64, challenger, legacy)
    assert not {"123", "99999"} & set(rows.ids) and rows.copies == 1
