"""The operator's promote and rollback move the pointer and the drift reference as one step."""

from __future__ import annotations

import json
import logging

import pytest

from protein.cli import main
from protein.registry import Registry
from protein.validation.reference import REFERENCE_PROFILE_KEY
from tests.model.test_registry import add_version


def reference_model(registry: Registry) -> str | None:
    if not registry.store.exists(REFERENCE_PROFILE_KEY):
        return None
    return json.loads(registry.store.get_bytes(REFERENCE_PROFILE_KEY))["model_id"]


def test_promote_that_cannot_write_the_reference_leaves_the_pointer(registry, trained, capsys):
    v = trained["model_id"]
    registry.promote(v, expected_champion=None)
    second = add_version(registry, v, "second", label_profile=registry.spec(v)["label_profile"])
    # A folder where the reference object goes: every write of it fails (as a refused PutObject would).
    registry.store.put_bytes(f"{REFERENCE_PROFILE_KEY}/blocker", b"x")
    code = main(["models", "promote", second, "--store", registry.store.uri])
    err = [line for line in capsys.readouterr().err.splitlines() if " error: " in line or "Traceback" in line]
    assert code == 3 and len(err) == 1 and "validation/reference_profile.json" in err[0], err
    assert registry.champion().champion == v and len(registry.champion().history) == 1


def test_promote_and_rollback_move_the_reference_with_the_pointer(registry, trained, capsys):
    v = trained["model_id"]
    second = add_version(registry, v, "second", label_profile=registry.spec(v)["label_profile"])
    uri = registry.store.uri
    assert main(["models", "promote", v, "--store", uri]) == 0
    assert reference_model(registry) == v
    assert main(["models", "promote", second, "--store", uri]) == 0
    assert reference_model(registry) == second
    assert main(["models", "rollback", "--store", uri]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["champion"] == v and out["reference_profile"]["hash"]
    assert reference_model(registry) == v


def test_a_refused_promotion_puts_the_reference_back(registry, trained, capsys, monkeypatch, caplog):
    v = trained["model_id"]
    caplog.set_level(logging.INFO, logger="protein.validation.reference")
    assert main(["models", "promote", v, "--store", registry.store.uri]) == 0
    assert [r.getMessage() for r in caplog.records if "reference label profile is now" in r.getMessage()]
    caplog.clear()
    before = registry.store.get_bytes(REFERENCE_PROFILE_KEY)
    broken = add_version(registry, v, "broken", label_profile=registry.spec(v)["label_profile"])
    spec_key = f"models/{broken}/model.json"
    # Resolvable when the reference is prepared, refused by the promotion itself (gone by then).
    real_promote = Registry.promote

    def promote_after_weights_vanish(self, version, *args, **kwargs):
        self.store.delete(f"models/{broken}/model.safetensors")
        return real_promote(self, version, *args, **kwargs)

    monkeypatch.setattr(Registry, "promote", promote_after_weights_vanish)
    code = main(["models", "promote", broken, "--store", registry.store.uri])
    assert code == 4 and "weights object missing" in capsys.readouterr().err
    assert registry.store.exists(spec_key) and registry.champion().champion == v
    assert registry.store.get_bytes(REFERENCE_PROFILE_KEY) == before
    # The log never said the reference moved: it was put back.
    assert not [r for r in caplog.records if "reference label profile is now" in r.getMessage()]


@pytest.mark.integration
def test_the_swap_sends_the_etag_it_read(trained, s3_bucket, monkeypatch):
    from protein.storage import open_store

    registry = Registry(open_store(s3_bucket))
    registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    registry.promote(trained["model_id"], expected_champion=None)
    second = add_version(registry, trained["model_id"], "second")
    client = registry.store._client()
    real_put = client.put_object
    sent: list[str | None] = []

    def put_object(**kwargs):
        if kwargs["Key"].endswith("registry/champion.json"):
            sent.append(kwargs.get("IfMatch"))
        return real_put(**kwargs)

    monkeypatch.setattr(client, "put_object", put_object)
    read = registry.store.etag("registry/champion.json")
    registry.promote(second)
    assert sent == [read] and read and read.startswith('"')
    with pytest.raises(ValueError, match="if_match must be the etag read from the object, got '\\*'"):
        registry.store.put_bytes("registry/champion.json", b"{}", if_match="*")


def test_a_move_that_fails_leaves_the_reference_of_whoever_is_champion_then(registry, trained, monkeypatch):
    """Two promotions read the reference, then each writes its own; the other's swap lands and this
    one's loses. Putting back what this one read before would describe a champion that no longer
    serves. And a move whose swap landed before a fault keeps the reference it wrote."""
    from protein.errors import PromotionConflict, StoreError
    from protein.validation import reference as reference_module
    from protein.validation.reference import champion_reference, move_champion

    v = trained["model_id"]
    profile = registry.spec(v)["label_profile"]
    assert main(["models", "promote", v, "--store", registry.store.uri]) == 0
    other, mine = (add_version(registry, v, name, label_profile=profile) for name in ("other", "mine"))
    real_put = reference_module.put_reference

    def the_other_writes_first(store, record, announce=True):  # noqa: ANN001, ANN202
        monkeypatch.setattr(reference_module, "put_reference", real_put)
        real_put(store, champion_reference(store, other), announce=False)  # the other move's write
        return real_put(store, record, announce)

    def the_other_swaps_and_mine_loses() -> None:
        registry.promote(other, expected_champion=v)
        raise PromotionConflict(f"champion is {other}, expected {v}; nothing was changed")

    monkeypatch.setattr(reference_module, "put_reference", the_other_writes_first)
    with pytest.raises(PromotionConflict):
        move_champion(registry.store, mine, the_other_swaps_and_mine_loses)
    assert registry.champion().champion == other
    assert reference_model(registry) == other

    def swap_lands_then_a_fault() -> None:
        registry.promote(mine, expected_champion=other)
        raise StoreError("the answer to the swap was lost, three times")

    with pytest.raises(StoreError):
        move_champion(registry.store, mine, swap_lands_then_a_fault)
    assert registry.champion().champion == mine and reference_model(registry) == mine
