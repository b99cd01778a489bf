"""An installed project (`pip install .`, as the worker image and the runbook's hosts do) holds every
package its shipped code imports, and the files those packages read: a flow run from outside a
checkout once failed with ModuleNotFoundError for `deployments`."""

from __future__ import annotations

import ast
import tomllib
from fnmatch import fnmatch
from pathlib import Path

from tests.helpers import REPO

PROJECT_PACKAGES = {"protein", "tasks", "flows", "deployments", "bench", "tests"}


def shipped_patterns() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]


def is_shipped(package: str) -> bool:
    return any(fnmatch(package, pattern) for pattern in shipped_patterns())


def project_imports(path: Path) -> set[str]:
    """The project's top-level packages a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT_PACKAGES


def test_every_project_package_the_shipped_code_imports_is_shipped() -> None:
    shipped = [top for top in sorted(PROJECT_PACKAGES) if is_shipped(top)]
    assert {"protein", "tasks", "flows"} <= set(shipped), shipped
    missing = {f"{path.relative_to(REPO)} imports {name}"
               for top in shipped for path in (REPO / top).rglob("*.py")
               for name in project_imports(path) if not is_shipped(name)}
    assert not missing, sorted(missing)


def test_the_files_the_deployments_package_reads_are_package_data() -> None:
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data.get("deployments", [])
    data_files = [p.relative_to(REPO / "deployments").as_posix() for p in (REPO / "deployments").rglob("*")
                  if p.is_file() and p.suffix in (".yaml", ".json")]
    assert data_files and all(any(fnmatch(f, pattern) for pattern in patterns) for f in data_files), \
        (data_files, patterns)
