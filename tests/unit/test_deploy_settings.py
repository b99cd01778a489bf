from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
    # Shorter than two heartbeats: every healthy run would be crashed between two of them.
    ({"PROTEIN_ZOMBIE_AFTER_S": "20"}, "PROTEIN_ZOMBIE_AFTER_S='20' must be a whole number of seconds >= 90"),
    ({"PROTEIN_ZOMBIE_AFTER_S": "89"}, "PROTEIN_ZOMBIE_AFTER_S='89' must be a whole number of seconds >= 90"),
    ({"PROTEIN_REPOSITORY": "."}, "PROTEIN_REPOSITORY='.' is a relative path"),
    ({"PROTEIN_REPOSITORY": "checkout/protein"}, "PROTEIN_REPOSITORY='checkout/protein' is a relative path"),
    ({"PROTEIN_REPOSITORY": "https://[::1/r.git"}, "PROTEIN_REPOSITORY is not a URL git can read"),
    ({"PROTEIN_ALERT_WEBHOOK_URL": "hooks.slack.com/services/T0"}, "PROTEIN_ALERT_WEBHOOK_URL is not an http"),
    ({"PROTEIN_ALERT_WEBHOOK_URL": "ftp://hooks.example/T0"}, "PROTEIN_ALERT_WEBHOOK_URL is not an http"),
    ({"PROTEIN_ALERT_WEBHOOK_URL": "https://"}, "PROTEIN_ALERT_WEBHOOK_URL is not an http"),
])
def test_a_bad_setting_is_named(change: dict[str, str], named: str) -> None:
    with pytest.raises(SettingError, match=named.replace("$", r"\$").replace("{", r"\{")):
        check_settings({**GOOD, **change}, HEAD)


def test_a_dirty_checkout_needs_an_explicit_commit() -> None:
    with pytest.raises(SettingError, match="PROTEIN_COMMIT is not set and this checkout has uncommitted changes"):
        check_settings(GOOD, None)
    assert check_settings({**GOOD, "PROTEIN_COMMIT": "b" * 40}, None).commit == "b" * 40


@pytest.mark.parametrize("repository", ["https://bot:ghp_SECRET123@github.com/you/p.git",
                                        "https://ghp_SECRET123@github.com/you/p.git",
                                        "ssh://git:ghp_SECRET123@github.com/you/p.git",
                                        "bot:ghp_SECRET123@github.com:you/p.git"])
def test_a_repository_url_with_credentials_is_refused_without_repeating_them(repository: str) -> None:
    # The URL is printed by the checks and stored in every deployment's pull step on the server.
    with pytest.raises(SettingError, match="PROTEIN_REPOSITORY holds credentials") as refused:
        check_settings({**GOOD, "PROTEIN_REPOSITORY": repository}, HEAD)
    assert "SECRET123" not in str(refused.value)


@pytest.mark.parametrize("repository", ["git@github.com:you/protein-pipeline.git", "ssh://git@github.com/you/p.git",
                                        "github.com:you/p.git", "gh:you/p.git",
                                        "/srv/git/protein-pipeline.git", "file:///srv/git/protein-pipeline.git",
                                        "https://github.com/you/protein-pipeline.git"])
def test_repository_urls_workers_clone_are_accepted(repository: str) -> None:
    assert check_settings({**GOOD, "PROTEIN_REPOSITORY": repository}, HEAD).repository == repository


def test_a_webhook_url_refused_is_never_repeated() -> None:
    # An incoming-webhook URL is itself a credential.
    with pytest.raises(SettingError) as refused:
        check_settings({**GOOD, "PROTEIN_ALERT_WEBHOOK_URL": "hooks.slack.com/services/T0/SECRET"}, HEAD)
    assert "SECRET" not in str(refused.value)


def test_the_zombie_minimum_follows_the_heartbeat_prefect_yaml_sets() -> None:
    import yaml

    from deployments.deploy import HEARTBEAT_FREQUENCY_S, PREFECT_FILE, ZOMBIE_AFTER_MIN_S

    env = yaml.safe_load(PREFECT_FILE.read_text())["definitions"]["env"]
    assert int(env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == HEARTBEAT_FREQUENCY_S
    assert ZOMBIE_AFTER_MIN_S == 3 * HEARTBEAT_FREQUENCY_S
    assert check_settings({**GOOD, "PROTEIN_ZOMBIE_AFTER_S": str(ZOMBIE_AFTER_MIN_S)}, HEAD).zombie_after_s == 90


# What `prefect deploy` reads from the deploying checkout besides the flows: each edited file must
# be refused, spelled out here so that the check's folders cannot drop one unnoticed.
DEFINITIONS = ("deployments/prefect.yaml", "deployments/automations.yaml")


@pytest.mark.parametrize("edited", [*DEFINITIONS, "flows/retrain.py", "protein/__init__.py"])
def test_an_edit_the_pinned_commit_lacks_is_refused(tmp_path: Path, edited: str) -> None:
    """`prefect deploy` registers this checkout's flows (their parameter schemas) and definitions,
    while the workers run the commit: an edit since the commit, staged or not, is refused."""
    from deployments.deploy import check_checkout_is

    git, commit = committed_checkout(tmp_path, (*DEFINITIONS, "flows/retrain.py"))
    check_checkout_is(commit, tmp_path)
    (tmp_path / edited).write_text("# edited, not committed\n")
    with pytest.raises(SettingError, match=f"^{edited} has changes not committed in {commit[:12]}: "):
        check_checkout_is(commit, tmp_path)
    git("add", edited)  # staged is not committed either
    with pytest.raises(SettingError, match=f"^{edited} has changes not committed in {commit[:12]}: "):
        check_checkout_is(commit, tmp_path)


def committed_checkout(root: Path, files: tuple[str, ...] = ()) -> tuple[Callable[..., str], str]:
    """A git checkout with one commit holding protein/, a .gitignore and ``files``; (its git, HEAD)."""
    import subprocess

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (root / "protein").mkdir()
    (root / "protein" / "__init__.py").write_text("")
    (root / ".gitignore").write_text("__pycache__/\n")
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")
    git("add", ".")
    git("commit", "-qm", "code")
    return git, git("rev-parse", "HEAD")


def test_the_code_deploy_registers_is_the_pinned_commits(tmp_path: Path) -> None:
    """`prefect deploy` imports the flows of the deploying checkout: it must be PROTEIN_COMMIT, with
    no untracked module in a code folder that committed code could import (workers never get it)."""
    from deployments.deploy import check_checkout_is

    git, first = committed_checkout(tmp_path)
    (tmp_path / "protein" / "__pycache__").mkdir()
    (tmp_path / "protein" / "__pycache__" / "x.pyc").write_bytes(b"")  # git-ignored: not the commit's code
    (tmp_path / "notes.txt").write_text("outside the code folders\n")
    check_checkout_is(first, tmp_path)
    (tmp_path / "protein" / "helper.py").write_text("")
    with pytest.raises(SettingError, match=r"^protein/helper\.py is untracked in this checkout: .* workers clone "
                                           f"{first[:12]} without it"):
        check_checkout_is(first, tmp_path)
    git("add", "protein/helper.py")
    git("commit", "-qm", "helper")
    second = git("rev-parse", "HEAD")
    with pytest.raises(SettingError, match=f"^PROTEIN_COMMIT={first[:12]} is not this checkout's HEAD "
                                           rf"\({second[:12]}\)"):
        check_checkout_is(first, tmp_path)
    check_checkout_is(second, tmp_path)


def test_deploy_refuses_a_commit_other_than_head_before_anything_else(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from deployments import deploy

    _, head = committed_checkout(tmp_path)
    monkeypatch.setattr(deploy, "REPO", tmp_path)
    monkeypatch.setattr(deploy, "preflight", lambda settings: pytest.fail("checked the store after the refusal"))
    for name, value in {**GOOD, "PROTEIN_COMMIT": "b" * 40}.items():
        monkeypatch.setenv(name, value)
    assert deploy.main(["--check"]) == 2
    assert capsys.readouterr().err == (f"deploy: PROTEIN_COMMIT={'b' * 12} is not this checkout's HEAD ({head[:12]}): "
                                       "`prefect deploy` registers the flows of the checkout it runs in; check out "
                                       "the commit, or leave PROTEIN_COMMIT unset to deploy HEAD\n")


def test_deploy_refuses_definitions_edited_since_the_pinned_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """PROTEIN_COMMIT set to HEAD skips the clean-checkout check (only an unset one needs it): the
    checkout check is what stops an edited automations.yaml, before anything reaches the server."""
    from deployments import deploy

    _, head = committed_checkout(tmp_path, DEFINITIONS)
    (tmp_path / "deployments" / "automations.yaml").write_text("# edited, not committed\n")
    monkeypatch.setattr(deploy, "REPO", tmp_path)
    monkeypatch.setattr(deploy, "preflight", lambda settings: pytest.fail("checked the store after the refusal"))
    for name, value in {**GOOD, "PROTEIN_COMMIT": head}.items():
        monkeypatch.setenv(name, value)
    assert deploy.main(["--check"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"deploy: deployments/automations.yaml has changes not committed in {head[:12]}: "), err
    assert err.count("\n") == 1, err
