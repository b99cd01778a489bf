"""Import modules in a background thread, for a step later in the same process that needs them.

A retrain run that hands training to a GPU host scores the challenger itself once training ends
(unless a score deployment does), and scoring starts by importing torch and torchvision: 2.5-3 s
of a 2-core host's CPU, every trained run, between "training completed" and the gate's first
score; the gate's report then imports matplotlib to draw its plot. The run spends the training
waiting on the API with a core to spare; importing then moves those seconds off the path from
training to promotion. It costs nothing the run would not spend: a run that trains scores and
draws.
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Sequence

from protein.process_gc import import_frozen

# What the retrain run's own scoring imports: the pipeline (torch), the model builder, and the
# torchvision models it imports when it first builds one (with torch._dynamo, ~1.5 s here).
SCORING_MODULES = ("protein.pipeline", "protein.modeling.model", "torchvision.models")
# What the gate's report draws its training plot with (protein/evaluation/report.py), on the CPU
# host whoever scores: matplotlib's pyplot and Agg backend, ~0.45 s of CPU to import, between the
# scores and the gate's decision in every retrain that trains. Importing the backend's module does
# not select it: the plot selects Agg when it is drawn.
GATE_REPORT_MODULES = ("matplotlib.pyplot", "matplotlib.backends.backend_agg")
# A process that ends while the thread still imports (a retrain whose dispatch failed at once) waits
# this long for the import to finish: an interpreter that shuts down under a daemon thread inside
# an extension module's import can end with a fatal error instead of its own exit status.
JOIN_AT_EXIT_S = 60.0

logger = logging.getLogger(__name__)


def preload(modules: Sequence[str], name: str = "protein-preload") -> threading.Thread:
    """Start importing ``modules`` in a daemon thread and return it. An import that fails is
    logged, never raised: the step that needs the module imports it again and reports the error
    where it belongs. Python's import lock makes a step that imports a module while this thread
    still loads it wait for the same load, not start a second one."""

    def load() -> None:
        for module in modules:
            try:
                import_frozen([module])  # its objects out of the collector's way (protein/process_gc.py)
            except Exception as exc:  # noqa: BLE001 (the using step re-imports and reports it)
                logger.debug("preloading %s failed: %s: %s", module, type(exc).__name__, exc)

    thread = threading.Thread(target=load, name=name, daemon=True)
    thread.start()
    atexit.register(thread.join, JOIN_AT_EXIT_S)
    return thread
