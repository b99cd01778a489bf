"""validate: data validation alone, for the data team."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow
from prefect.states import Failed

from flows.cli import checked_params, run_with_prefect
from flows.params import ValidationParams, failed, report_state
from protein.locations import default_store_uri
from tasks.channels import resolve_dataset
from tasks.validation import validate_data


@flow(name="validate")
def validate(data: str, store: str | None = None, validation: ValidationParams = ValidationParams()) -> dict[str, Any]:
    """Validate a dataset; the run fails when the data does (see the validation-summary artifact).

    Args:
        data: a dataset channel (channel:latest, resolved once at run start to its newest push,
            even one validation refused before) or
            a dataset as the worker sees it: a folder, the competition zip, s3://bucket/prefix/ or
            s3://bucket/key.zip
        store: model store, where the report and the drift reference live: a local folder or
            s3://bucket/prefix; empty takes the worker's PROTEIN_STORE (default work/store)
        validation: what the data must look like
    """
    # One store for both: resolved with the worker's store but validated without one, the data was
    # judged against the built-in drift profile, not the champion's, and no report was kept for the
    # nightly's channel resolution to pass a refused push over.
    store = store or default_store_uri()
    # The channel's head, refused or not: a push validation refused is judged again here (its cause
    # mended, say), where passing it over validated an older push and looked green.
    resolved = resolve_dataset(data, store, pass_over_refused=False)
    if resolved.get("problem"):
        return failed(f"data {data}: {resolved['problem']}", resolved.get("exit_code", 1))
    report = validate_data(resolved["uri"], validation.to_config(), store)
    if not report["success"]:
        return Failed(message=f"data failed validation: {'; '.join(report['failures'][:3])}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.validate", description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--store")
    parser.add_argument("--image-size", type=int, default=ValidationParams().image_size)
    parser.add_argument("--drift-action", choices=("fail", "warn"), default="fail")
    args = parser.parse_args(argv)
    params = checked_params("python -m flows.validate",
                            lambda: ValidationParams(image_size=args.image_size, drift_action=args.drift_action))
    if isinstance(params, int):
        return params

    def run() -> int:
        state = validate(data=args.data, store=args.store, validation=params, return_state=True)
        return report_state(state, "validate")

    return run_with_prefect("python -m flows.validate", run)


if __name__ == "__main__":
    sys.exit(main())
