"""What a validating process costs in CPU with and without `scipy.stats` and `altair` deferred
(protein/validation/gx_loading.py), side by side.

Great Expectations imports `scipy.stats` while it imports itself, for Expectations this project
never runs. Each process kind is a fresh interpreter that goes through the path such a process
takes, imports included, and exits:

- `validation`: the library's validation of 24 synthetic images of 40 px, the size of the soak's
  pushes (no Data Docs): what `protein validate` and a push's refused run do;
- `validation, then scoring's imports`: the same, then torch and torchvision as a CPU host's
  retrain loads them to score (torch reads `__file__` of every loaded module while it imports,
  which would have run a standard `LazyLoader`'s module).

`ours` is the process as shipped; `baseline` imports `scipy.stats` and `altair` first, as GX's own
import did, so nothing is deferred. The two alternate round by round, so drift of a loaded machine hits both
alike. CPU seconds (user + system) of each process from `wait4`; medians.

    python -m bench.gx_import [--quick] [--rounds 5]
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from bench.common import bench_dataset, parse_rounds, process_cpu_versus_baseline, publish_process_cpu

NAME = "gx_import"
VALIDATE = ("import sys\nfrom pathlib import Path\nfrom protein.validation import ValidationConfig, validate_dataset\n"
            "validate_dataset(Path(sys.argv[1]), ValidationConfig(image_size=40))\n")
KINDS: dict[str, str] = {
    "validation": VALIDATE,
    "validation, then scoring's imports": VALIDATE + "from protein.preload import SCORING_MODULES, preload\n"
                                                     "preload(SCORING_MODULES).join()\n",
}
BASELINE_START = "import scipy.stats, altair\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    rounds, quick = parse_rounds(argv, "python -m bench.gx_import", __doc__.splitlines()[0], quick_rounds=1)
    with tempfile.TemporaryDirectory(prefix="protein-bench-gx-") as tmp:
        data = bench_dataset(24, 40, root=Path(tmp))
        rows = process_cpu_versus_baseline(KINDS, BASELINE_START, rounds, args=[str(data)])
    return publish_process_cpu(NAME, rows, rounds, quick)


if __name__ == "__main__":
    main()
