"""predict: champion (or a named version) -> submission for a dataset's test set."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from prefect import flow
from prefect.states import State

from flows.cli import run_with_prefect
from flows.params import failed, report_state
from protein.locations import default_store_uri
from tasks.channels import resolve_dataset
from tasks.prediction import predict_submission


@flow(name="predict", flow_run_name="predict-{model}")
def predict(data: str, store: str | None = None, model: str | list[str] = "champion") -> dict[str, Any] | State:
    """Write submissions/<model>/<utc>/submission.csv and submissions/latest.json to the store.

    Args:
        data: a dataset channel (channel:latest, resolved once at run start to its newest push) or
            a dataset as the worker sees it: a folder, the competition zip, s3://bucket/prefix/ or
            s3://bucket/key.zip
        store: model store: a local folder or s3://bucket/prefix; empty takes the worker's
            PROTEIN_STORE (default work/store)
        model: champion, a version id, or several ids for an ensemble (the mean of their
            test-time-augmented probabilities)
    """
    store = store or default_store_uri()
    resolved = resolve_dataset(data, store)
    if resolved.get("problem"):
        return failed(f"data {data}: {resolved['problem']}", resolved.get("exit_code", 1))
    return predict_submission(resolved["uri"], store, model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.predict", description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--store", default=default_store_uri())
    parser.add_argument("--model", nargs="+", default=["champion"], help="version id(s); several: an ensemble")
    args = parser.parse_args(argv)
    model = args.model[0] if len(args.model) == 1 else args.model

    def run() -> int:
        state = predict(data=args.data, store=args.store, model=model, return_state=True)
        return report_state(state, "predict")

    return run_with_prefect("python -m flows.predict", run)


if __name__ == "__main__":
    sys.exit(main())
