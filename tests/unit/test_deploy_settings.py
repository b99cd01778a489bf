from __future__ import annotations

import pytest

from deployments.deploy import SettingError, check_settings

GOOD = {"PROTEIN_REPOSITORY": "https://github.com/you/protein-pipeline.git", "PROTEIN_STORE": "s3://b/p",
        "PROTEIN_ALERT_WEBHOOK_URL": "https://hooks.example/T0"}
HEAD = "a" * 40


def test_complete_settings_pin_the_clean_head_and_one_gpu_slot() -> None:
    settings = check_settings(GOOD, HEAD)
    assert (settings.commit, settings.gpu_slots, settings.store) == (HEAD, 1, "s3://b/p")
    assert settings.env()["PROTEIN_COMMIT"] == HEAD


@pytest.mark.parametrize(("change", "named"), [
    ({"PROTEIN_STORE": ""}, "PROTEIN_STORE is not set"),
    ({"PROTEIN_ALERT_WEBHOOK_URL": "{{ $PROTEIN_ALERT_WEBHOOK_URL }}"}, "PROTEIN_ALERT_WEBHOOK_URL is not set"),
    ({"PROTEIN_REPOSITORY": "  "}, "PROTEIN_REPOSITORY is not set"),
    ({"PROTEIN_STORE": "work/store"}, "PROTEIN_STORE='work/store' is a relative path"),
    ({"PROTEIN_ZOMBIE_AFTER_S": "soon"}, "PROTEIN_ZOMBIE_AFTER_S='soon' must be a whole number"),
    ({"PROTEIN_COMMIT": "v1.2"}, "PROTEIN_COMMIT='v1.2' is not a full 40-hex commit sha"),
    ({"PROTEIN_GPU_SLOTS": "0"}, "PROTEIN_GPU_SLOTS='0' must be a whole number >= 1"),
])
def test_a_bad_setting_is_named(change: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError, match=named.replace("$", r"\$").replace("{", r"\{")):
        check_settings({**GOOD, **change}, HEAD)


def test_a_dirty_checkout_needs_an_explicit_commit() -> None:
    with pytest.raises(SettingError, match="PROTEIN_COMMIT is not set and this checkout has uncommitted changes"):
        check_settings(GOOD, None)
    assert check_settings({**GOOD, "PROTEIN_COMMIT": "b" * 40}, None).commit == "b" * 40
