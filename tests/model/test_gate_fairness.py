"""The gate after the data changed: real training, real registry, real evaluation."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from protein.config import GateConfig, TrainConfig
from protein.evaluation.gate import decide, ids_digest
from protein.evaluation.report import gate_markdown
from protein.pipeline import evaluate_for_gate
from protein.registry import Registry
from protein.storage import open_store
from tests.helpers import TINY_ARCH, module_scratch, write_dataset

LENIENT = GateConfig(min_score=0.0, min_gain=-1.0, max_class_drop=1.0, min_rows=1)


@pytest.fixture(scope="module")
def changed_data(tmp_path_factory: pytest.TempPathFactory, trainer: Callable[..., dict]) -> Iterator[dict]:
    """A champion trained on 60 rows, then 60 more rows arrive and a challenger trains on all 120."""
    with module_scratch(tmp_path_factory, "gate-fairness") as root:
        rng = random.Random(1)
        labels = {str(i): " ".join(map(str, rng.sample(range(10), rng.randint(1, 2)))) for i in range(120)}
        old = write_dataset(root / "old", dict(list(labels.items())[:60]), ["900"], size=32)
        new = write_dataset(root / "new", labels, ["900"], size=32)
        store, cache = str(root / "store"), root / "cache"
        # batch 10: a last batch of one image would trip BatchNorm in training (49 rows, batch 16)
        config = TrainConfig(arch=TINY_ARCH, image_size=32, epochs=1, batch_size=10, seed=0)
        champion = trainer(old, store, config, cache_dir=cache)["model_id"]
        Registry(open_store(store)).promote(champion, expected_champion=None)
        challenger = trainer(new, store, TrainConfig(arch=TINY_ARCH, image_size=32, epochs=1, batch_size=16, seed=1),
                                        cache_dir=cache)["model_id"]
        yield {"old": old, "new": new, "store": store, "cache": cache, "champion": champion, "challenger": challenger}


def test_model_json_records_the_exact_rows_and_the_data(changed_data):
    registry = Registry(open_store(changed_data["store"]))
    spec = registry.spec(changed_data["champion"])
    holdout, train = spec["holdout"]["ids"], spec["training_rows"]["ids"]
    assert len(holdout) == spec["holdout"]["n_holdout"] and len(train) == spec["holdout"]["n_train"]
    assert sorted(holdout + train, key=int) == [str(i) for i in range(60)]
    assert spec["holdout"]["ids_sha256"] == ids_digest(holdout)
    assert spec["training_rows"]["sha256"] == ids_digest(train)
    assert spec["data_fingerprint"] != registry.spec(changed_data["challenger"])["data_fingerprint"]


def test_after_a_data_change_both_models_are_scored_only_on_rows_neither_trained_on(changed_data):
    registry = Registry(open_store(changed_data["store"]))
    champion_spec = registry.spec(changed_data["champion"])
    challenger_spec = registry.spec(changed_data["challenger"])
    result = evaluate_for_gate(changed_data["new"], changed_data["store"], changed_data["challenger"],
                               changed_data["champion"], changed_data["cache"])
    rows = result["rows"]
    ids = set(rows["ids"])
    champion_trained = set(champion_spec["training_rows"]["ids"])
    assert ids == set(challenger_spec["holdout"]["ids"]) - champion_trained
    assert not ids & champion_trained and not ids & set(challenger_spec["training_rows"]["ids"])
    # The challenger's own holdout had rows the champion trained on: the old gate scored it on them.
    assert rows["excluded"] == len(set(challenger_spec["holdout"]["ids"]) & champion_trained) > 0
    new_rows = {i for i in ids if int(i) >= 60}
    assert (rows["new"], rows["from_champion_holdout"]) == (len(new_rows), len(ids - new_rows))
    assert rows["n"] == len(ids) == result["challenger"]["n_images"] == result["champion"]["n_images"]
    assert result["challenger"]["rows"]["sha256"] == result["champion"]["rows"]["sha256"] == ids_digest(ids)

    # Fewer rows than the documented default minimum: the gate says so and keeps the champion,
    # however lenient the rest of its configuration.
    assert rows["n"] < GateConfig().min_rows
    strict = GateConfig(min_score=0.0, min_gain=-1.0, max_class_drop=1.0)
    decision = decide(result["challenger"], result["champion"], strict)
    assert not decision.promote
    assert f"only {rows['n']} rows neither model trained on, fewer than the {strict.min_rows}" in decision.reasons[-1]

    # Enough rows for this configuration: the decision carries the paired interval and the row set.
    decision = decide(result["challenger"], result["champion"], LENIENT).to_dict()
    assert decision["promote"] and decision["gain_interval"]["rows"] == rows["n"]
    assert decision["rows"]["selection"] == rows["selection"]
    assert "95% interval [" in gate_markdown(decision, changed_data["challenger"], changed_data["champion"])


def test_a_champion_whose_rows_are_unknown_is_not_compared(changed_data, tmp_path: Path):
    """A champion from before rows were recorded, trained on other data: no row is known to be
    unseen by it, so the gate refuses the comparison instead of scoring it on its training rows."""
    source = Registry(open_store(changed_data["store"]))
    local = source.download(changed_data["champion"], tmp_path / "dl")
    spec = json.loads((local / "model.json").read_text())
    legacy = {k: v for k, v in spec.items() if k not in ("training_rows", "holdout")}
    legacy["holdout"] = {k: spec["holdout"][k] for k in ("fraction", "seed", "n_train", "n_holdout")}
    registry = Registry(open_store(str(tmp_path / "store")))
    old_champion = registry.register(local / "model.safetensors", legacy, version="legacy-champion")
    registry.import_version(source, changed_data["challenger"])

    result = evaluate_for_gate(changed_data["new"], str(tmp_path / "store"), changed_data["challenger"],
                               old_champion, changed_data["cache"])
    assert result["rows"]["n"] == 0 and "unknown" in result["rows"]["problem"]
    assert "per_class" not in result["champion"]  # never scored on rows it may have trained on
    decision = decide(result["challenger"], result["champion"], LENIENT)
    assert not decision.promote and decision.reasons[-1].startswith("no fair comparison")
