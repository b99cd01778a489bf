"""What a flow run's or a command's process costs in CPU, with and without protein/process_gc.py's
freezes (after a step's first import of a heavy library, and at exit), side by side.

Each process kind is a fresh interpreter that goes through the code path that process takes,
imports included, with a little of its work, and exits:

- `quiet nightly`: Prefect and the retrain flow (a nightly that finds its data unchanged);
- `GPU-host training`: Prefect, the train flow, the training task's import of the pipeline
  (torch, torchvision), one resnet18 built;
- `CPU-host retrain`: Prefect, the retrain flow, its preload of the scoring modules, the validation
  task's import of Great Expectations, challenger and champion built for scoring;
- `protein command`: the CLI with the training pipeline (`protein train`, `protein predict`).

`ours` is the process as shipped; `baseline` is the same process with `gc.freeze` made a no-op
before anything is imported, so every collection walks everything, as before. The two alternate
round by round, so drift of a loaded machine hits both alike. CPU seconds (user + system) of each
process from `wait4`; medians.

    python -m bench.process_exit [--quick] [--rounds 5]
"""

from __future__ import annotations

from typing import Any

from bench.common import parse_rounds, process_cpu_versus_baseline, publish_process_cpu

NAME = "process_exit"
KINDS: dict[str, str] = {
    "quiet nightly": "import prefect, flows.retrain",
    "GPU-host training": "import prefect, flows.train\nfrom protein.process_gc import import_frozen\n"
                         "import_frozen(['protein.pipeline'])\nfrom protein.modeling.model import build_model\n"
                         "build_model('resnet18')",
    "CPU-host retrain": "import prefect, flows.retrain\nfrom protein.preload import SCORING_MODULES, preload\n"
                        "preload(SCORING_MODULES).join()\nfrom protein.process_gc import import_frozen\n"
                        "from protein.validation.gx_loading import defer_what_gx_never_runs\n"
                        "defer_what_gx_never_runs()\n"
                        "import_frozen(['great_expectations'])\nfrom protein.modeling.model import build_model\n"
                        "models = [build_model('resnet18') for _ in range(2)]",
    "protein command": "import protein.pipeline, torchvision.models\nfrom protein.cli import main\n"
                       "try:\n    main(['--help'])\nexcept SystemExit:\n    pass",
}
BASELINE_START = "import gc\ngc.freeze = lambda: None\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    rounds, quick = parse_rounds(argv, "python -m bench.process_exit", __doc__.splitlines()[0], quick_rounds=3)
    return publish_process_cpu(NAME, process_cpu_versus_baseline(KINDS, BASELINE_START, rounds), rounds, quick)


if __name__ == "__main__":
    main()
