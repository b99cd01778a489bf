"""The Prefect UI's run form explains every field of every deployed flow: Prefect takes each
parameter's description from the flow docstring's Args section."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

DEPLOYED = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("entrypoint", sorted({d["entrypoint"] for d in DEPLOYED}))
def test_every_parameter_of_a_deployed_flow_is_described(entrypoint: str) -> None:
    from prefect.utilities.callables import parameter_schema

    path, name = entrypoint.split(":")
    flow = getattr(importlib.import_module(Path(path).with_suffix("").as_posix().replace("/", ".")), name)
    properties = parameter_schema(flow).model_dump()["properties"]
    undescribed = [p for p, schema in properties.items() if len(schema.get("description") or "") < 10]
    assert not undescribed, f"{entrypoint}: the run form shows {undescribed} without a description"
