"""The multi-host test's worker "hosts" get the project only from the clone their pull step made:
the environment `host_env` gives them (test_multihost.py's hosts) loads a flow the way a Prefect
flow run does, from a clone, and a module deleted from that clone is missing, not read from the
checkout through the shared virtualenv's editable install."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ProteinProcess
from tests.helpers import REPO
from tests.integration.prefect_services import host_env

pytestmark = pytest.mark.integration

# What a flow run does after its pull step: chdir into the clone, load the entrypoint with Prefect's
# loader (which puts the working directory on sys.path), then report where the project came from.
LOAD_LIKE_A_FLOW_RUN = """
import json, os, sys
os.chdir(sys.argv[1])
from prefect.utilities.importtools import import_object
try:
    import_object("flows/validate.py:validate")
except Exception as exc:  # Prefect wraps what the script raised
    cause = exc.__cause__ or exc
    while getattr(cause, "user_exc", None) is not None:
        cause = cause.user_exc
    print(json.dumps({"error": f"{type(cause).__name__}: {cause}"}))
    raise SystemExit(0)
print(json.dumps({name: sys.modules[name].__file__ for name in ("protein", "protein.labels", "flows", "tasks")}))
"""


def clone_of_checkout(root: Path) -> Path:
    clone = root / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    return clone


def load_on_host(protein_process: ProteinProcess, clone: Path, root: Path) -> dict[str, str]:
    env = host_env(dict(os.environ), root / "host")
    result = protein_process.python(LOAD_LIKE_A_FLOW_RUN, str(clone), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_host_imports_the_project_from_its_clone(protein_process: ProteinProcess, tmp_path: Path) -> None:
    clone = clone_of_checkout(tmp_path)
    loaded = load_on_host(protein_process, clone, tmp_path)
    assert "error" not in loaded, loaded
    for name, file in loaded.items():
        assert Path(file).resolve().is_relative_to(clone.resolve()), (name, file)


def test_a_module_missing_from_the_clone_is_missing_on_the_host(protein_process: ProteinProcess,
                                                                tmp_path: Path) -> None:
    clone = clone_of_checkout(tmp_path)
    (clone / "protein" / "labels.py").unlink()
    loaded = load_on_host(protein_process, clone, tmp_path)
    assert loaded.get("error", "").startswith("ModuleNotFoundError: No module named 'protein.labels'"), loaded
