"""Deploy-time checks (deployments/checks.py) against real git repositories and a real local store,
and the shape of deployments/prefect.yaml that the loop depends on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from deployments.checks import SettingError, check_data, check_repository, check_store, placeholders
from deployments.deploy import PREFECT_FILE
from protein.data.channels import advance_channel
from protein.storage import LocalStore
from tests.helpers import write_dataset


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def pushed_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A checkout with two commits, of which only the first is pushed to its bare remote."""
    remote, work = tmp_path / "remote.git", tmp_path / "work"
    git("init", "-q", "--bare", str(remote), cwd=tmp_path)
    git("init", "-q", "-b", "main", str(work), cwd=tmp_path)
    for name in ("one", "two"):
        (work / name).write_text(name)
        git("add", name, cwd=work)
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", name, cwd=work)
        if name == "one":
            git("push", "-q", str(remote), "main", cwd=work)
    return remote, work


def test_a_pushed_commit_is_reachable_and_an_ancestor_of_a_tip_too(pushed_checkout: tuple[Path, Path]) -> None:
    remote, work = pushed_checkout
    first = git("rev-parse", "HEAD~1", cwd=work)
    assert check_repository(str(remote), first, work) == f"repository {remote} has commit {first[:12]}"
    git("push", "-q", str(remote), "main", cwd=work)  # now the first commit is behind the tip
    assert "(behind " in check_repository(str(remote), first, work)


def test_an_unpushed_commit_is_refused_naming_it(pushed_checkout: tuple[Path, Path]) -> None:
    remote, work = pushed_checkout
    head = git("rev-parse", "HEAD", cwd=work)
    with pytest.raises(SettingError, match=rf"PROTEIN_COMMIT={head[:12]} is on no branch or tag of .*git push it"):
        check_repository(str(remote), head, work)


def test_an_unreachable_repository_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=r"PROTEIN_REPOSITORY=.*missing\.git: git ls-remote failed: "):
        check_repository(str(tmp_path / "missing.git"), "a" * 40, tmp_path)


def test_data_checks_need_a_pushed_channel_whose_dataset_opens(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(SettingError, match="retrain/nightly: data channel:latest: .*no dataset was pushed"):
        check_data("channel:latest", store.uri, "retrain/nightly")
    # A channel that points at a dataset nobody can open (deleted) is refused too.
    advance_channel(store, "latest", str(tmp_path / "gone"), "a" * 16, "e1", "t", "t")
    with pytest.raises(SettingError, match=r"retrain/nightly: data channel:latest: .*gone"):
        check_data("channel:latest", store.uri, "retrain/nightly")
    dataset = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=8)
    advance_channel(store, "latest", str(dataset), "b" * 16, "e2", "t", "t")
    assert check_data("channel:latest", store.uri, "retrain/nightly") == (
        f"retrain/nightly: data channel:latest is push #2 ({dataset})")


def test_a_store_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SettingError, match=r"PROTEIN_STORE=.*file/store: .*is not a folder"):
        check_store(str(tmp_path / "file" / "store"))
    assert check_store(str(tmp_path / "store")).endswith("answers and supports conditional writes")


def test_placeholders_are_found_wherever_they_sit() -> None:
    registered = {"parameters": {"store": "{{ $PROTEIN_STORE }}", "data": "channel:latest"},
                  "pull_steps": [{"git_clone": {"repository": "{{ $PROTEIN_REPOSITORY }}", "commit_sha": "ab"}}],
                  "job_variables": {"env": {"PROTEIN_STORE": "s3://b/p"}}}
    assert list(placeholders(registered)) == ["parameters.store: {{ $PROTEIN_STORE }}",
                                              "pull_steps[0].git_clone.repository: {{ $PROTEIN_REPOSITORY }}"]
    assert list(placeholders({"parameters": {"data": "channel:{{ event.payload.channel }}"}})) == []


def test_the_nightly_follows_the_channel_and_queues_instead_of_cancelling() -> None:
    deployments = {d["name"]: d for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]}
    nightly = deployments["nightly"]
    assert nightly["parameters"]["data"] == "channel:latest"
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    assert nightly["triggers"][0]["parameters"]["data"] == "channel:{{ event.payload.channel | default('') }}"
    assert "PROTEIN_DATA" not in PREFECT_FILE.read_text(), "no dataset is pinned at deploy time"


def test_every_deployment_carries_the_project_tag() -> None:
    """The deploy check finds leftover deployments by it, and the run automations match runs by it."""
    import yaml

    from deployments.checks import PROJECT_TAG
    from deployments.deploy import PREFECT_FILE

    for deployment in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]:
        assert PROJECT_TAG in deployment.get("tags", []), deployment["name"]


def test_the_store_check_says_when_conditional_writes_were_not_verified(monkeypatch) -> None:  # noqa: ANN001
    """The operator's keys may not write probes/ (only the trainer's may): the probe was skipped, and the
    wrapper still printed 'supports conditional writes'."""
    import protein.storage
    from deployments.checks import check_store
    from protein.errors import StoreError
    from protein.storage.s3_conditional_writes import require_conditional_writes

    class DeniedProbe:
        uri = "s3://b/p"

        def put_bytes(self, key: str, data: bytes, **kwargs: object) -> str:
            raise StoreError(f"s3://b/p/{key}: access denied: s3:PutObject")

    assert require_conditional_writes(DeniedProbe()) is False  # type: ignore[arg-type]

    class Checked:
        def __init__(self, verified: bool) -> None:
            self.verified = verified

        def check(self) -> None:
            self.conditional_writes_verified = self.verified

    monkeypatch.setattr(protein.storage, "open_store", lambda uri: Checked(False))
    assert "conditional writes NOT verified" in check_store("s3://b/p")
    monkeypatch.setattr(protein.storage, "open_store", lambda uri: Checked(True))
    assert check_store("s3://b/p") == "store s3://b/p answers and supports conditional writes"
