"""Data validation with Great Expectations: nothing is trained on data that fails it.

- `config`: ValidationConfig, the one frozen config.
- `suites`: the checks as pandas tables (labels, files, images, integrity, distribution).
- `images`: one read per image: PNG header and trailer, the training decoder's verdict, content hash.
- `drift`: label profiles and the sample-size-aware drift test (pure numpy).
- `expectations`: custom GX Expectations with their own metrics, `_validate` and renderers.
- `checkpoint`: the Data Source, an asset and Validation Definition per table, the Checkpoint, Data Docs.
- `reference`: the reference profile in the store (the champion's training data).
- `report`: ValidationReport and its one-line findings.
- `runner`: validate_dataset / run_validation.
- `gx_loading`: Great Expectations imported without the modules it never uses here (deferred).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protein.lazy_exports import lazy_exports
from protein.validation.config import ValidationConfig
from protein.validation.report import ValidationReport

if TYPE_CHECKING:  # loaded on first use (below); named here for type checkers
    from protein.validation.drift import REFERENCE_PROFILE, profile_labels
    from protein.validation.reference import load_reference, write_reference_profile
    from protein.validation.runner import run_validation, validate_dataset

# The rest load on first use: they import numpy, pandas and (to run) Great Expectations, which a
# process that only reads its settings (every retrain run's parameters, a nightly that finds its
# data unchanged and validates nothing) would otherwise import at start (docs/testing.md: ~0.2 CPU-s a run).
_LAZY = {"REFERENCE_PROFILE": "drift", "profile_labels": "drift", "load_reference": "reference",
         "write_reference_profile": "reference", "run_validation": "runner", "validate_dataset": "runner"}

__all__ = ["REFERENCE_PROFILE", "ValidationConfig", "ValidationReport", "load_reference", "profile_labels",
           "run_validation", "validate_dataset", "write_reference_profile"]


__getattr__ = lazy_exports(__name__, globals(), _LAZY)
