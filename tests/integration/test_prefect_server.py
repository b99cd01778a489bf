"""Deploy-time checks of `python -m deployments.deploy`, the wrapper operators run instead of
bare `prefect deploy`. The full path (server, pools, workers on separate hosts, retrain through
the API) is tests/integration/test_multihost.py; the process helpers are in prefect_services."""

from __future__ import annotations

import pytest

from tests.conftest import ProteinProcess
from tests.helpers import REPO
from tests.integration.prefect_services import prefect_env

pytestmark = [pytest.mark.integration]

SETTINGS = {"PROTEIN_REPOSITORY": "https://example.invalid/protein-pipeline.git", "PROTEIN_STORE": "s3://bucket/store",
            "PROTEIN_ALERT_WEBHOOK_URL": "http://127.0.0.1:9/hook", "PROTEIN_COMMIT": "0" * 40}


@pytest.mark.parametrize("unset", ["PROTEIN_REPOSITORY", "PROTEIN_STORE", "PROTEIN_ALERT_WEBHOOK_URL"])
def test_deploy_with_an_unset_setting_fails_naming_it_before_any_prefect_call(
        unset: str, tmp_path, closed_port: int, protein_process: ProteinProcess) -> None:
    # Nothing listens on this API: had the wrapper called prefect, it would fail another way (exit 1).
    env = prefect_env(tmp_path / "home", {**SETTINGS, "PREFECT_API_URL": f"http://127.0.0.1:{closed_port}/api"})
    del env[unset]
    result = protein_process.module("deployments.deploy", cwd=REPO, env=env, timeout=120)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"deploy: {unset} is not set: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
