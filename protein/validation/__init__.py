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
"""

from protein.validation.config import ValidationConfig
from protein.validation.drift import REFERENCE_PROFILE, profile_labels
from protein.validation.reference import load_reference, write_reference_profile
from protein.validation.report import ValidationReport
from protein.validation.runner import run_validation, validate_dataset

__all__ = ["REFERENCE_PROFILE", "ValidationConfig", "ValidationReport", "load_reference", "profile_labels",
           "run_validation", "validate_dataset", "write_reference_profile"]
