"""What a flow-run process loads before its flow decides anything. Every run on the CPU host
starts by importing its flow module; a nightly on unchanged data is done a second later. torch and
torchvision (1.5-2.5 s of import here) wait until a task needs a model; pandas and Great
Expectations (0.3 s and ~3 s) until a task validates or reads a table."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import ProteinProcess
from tests.helpers import REPO

FLOW_MODULES = ("flows.retrain", "flows.validate", "flows.predict", "flows.train", "flows.score", "flows.demo")
PRINT_TORCH = "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} & {'torch', 'torchvision'})))"
PRINT_TABLES = ("print(json.dumps(sorted({n.split('.')[0] for n in sys.modules} "
                "& {'pandas', 'great_expectations', 'scipy'})))")
IMPORT_ARGV = "import importlib, json, sys; [importlib.import_module(m) for m in sys.argv[1:]]; "
LOADED = IMPORT_ARGV + PRINT_TORCH
CLI_LOADED = "import json, sys, protein.cli\ntry:\n    protein.cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n" \
             + PRINT_TORCH


def loaded(protein_process: ProteinProcess, code: str, *args: str) -> list[str]:
    """What ``code`` printed last in a fresh interpreter: which of the modules it asks about were imported."""
    result = protein_process.python(code, *args, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_flow_modules_load_without_torch(protein_process: ProteinProcess) -> None:
    assert loaded(protein_process, LOADED, *FLOW_MODULES) == [], "a flow module imports torch at its top"


def test_the_commands_without_a_model_load_without_torch(protein_process: ProteinProcess, tmp_path: Path) -> None:
    """`protein datasets push` runs on every push, on hosts that may have no GPU stack warmed up: its
    parser's defaults once imported the whole pipeline, torch included (2.1 s -> 0.4 s a command)."""
    for argv in (["datasets", "list", "--store", str(tmp_path)], ["models", "list", "--store", str(tmp_path)],
                 ["link", "s3://bucket/key"]):
        assert loaded(protein_process, CLI_LOADED, *argv) == [], f"protein {' '.join(argv[:2])} imports torch"


def test_a_training_config_is_checked_without_torch(protein_process: ProteinProcess) -> None:
    """The CPU host's retrain builds the challenger's TrainConfig (checking its architecture) before
    dispatching training to a GPU host: that once imported torchvision into every retrain run."""
    code = ("import json, sys; from flows.params import TrainParams; "
            "TrainParams(arch='convnext_tiny').to_config()\n" + PRINT_TORCH)
    assert loaded(protein_process, code) == [], "building a TrainConfig imports torch"


def test_the_flow_modules_load_without_pandas_or_great_expectations(protein_process: ProteinProcess) -> None:
    """A retrain run imports its flow module first: every nightly on unchanged data and every push run
    superseded by a newer one ends without validating, and once spent ~0.2 s of CPU importing pandas
    through `protein.data` and `protein.validation` (`import flows.retrain` after Prefect, from
    source: 0.51 -> 0.30 CPU-s, docs/testing.md)."""
    code = IMPORT_ARGV + PRINT_TABLES
    flows = [m for m in FLOW_MODULES if m != "flows.demo"]  # `make run`'s driver reads its tables at once
    assert loaded(protein_process, code, *flows) == [], "a flow module imports pandas or GX at its top"


def test_a_validation_runs_great_expectations_without_what_it_never_uses(protein_process: ProteinProcess,
                                                                         tmp_path: Path) -> None:
    """GX imports `scipy.stats` and `altair` (~1 CPU-s with the exit) for Expectations no suite here
    runs: a process that validates with Data Docs, then imports torch to score as a retrain does,
    never runs their code; read, they still work (protein/validation/gx_loading.py)."""
    code = ("import json, sys\nfrom pathlib import Path\nfrom tests.helpers import write_dataset\n"
            "from protein.validation import ValidationConfig, run_validation\n"
            "data = write_dataset(Path(sys.argv[1]), {str(i): '0 4' for i in range(12)}, ['900'])\n"
            "report = run_validation(data, ValidationConfig(image_size=32), report_dir=Path(sys.argv[2]))\n"
            "import torch, torchvision.models\n"
            "ran = sorted(n for n in ('scipy.stats._stats_py', 'altair.vegalite') if n in sys.modules)\n"
            "from scipy import stats\nimport altair\n"
            "used = [round(float(stats.entropy([1, 1], [1, 3])), 4), altair.Chart.__name__]\n"
            "print(json.dumps([report.success, ran, used]))")
    assert loaded(protein_process, code, str(tmp_path / "data"), str(tmp_path / "report")) \
        == [True, [], [0.1438, "Chart"]]
    assert (tmp_path / "report" / "report.json").is_file()
