"""What a flow-run process loads before its flow decides anything. Every run on the CPU host
starts by importing its flow module; a nightly on unchanged data is done a second later. torch and
torchvision (1.5-2.5 s of import here) wait until a task needs a model."""

from __future__ import annotations

import json

from tests.conftest import ProteinProcess
from tests.helpers import REPO

FLOW_MODULES = ("flows.retrain", "flows.validate", "flows.predict", "flows.train", "flows.score", "flows.demo")
LOADED = "import importlib, json, sys; [importlib.import_module(m) for m in sys.argv[1:]]; " \
         "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'torchvision'})))"


def test_the_flow_modules_load_without_torch(protein_process: ProteinProcess) -> None:
    result = protein_process.python(LOADED, *FLOW_MODULES, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [], "a flow module imports torch at its top"
