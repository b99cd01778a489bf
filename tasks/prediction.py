"""Tasks that predict the test set and publish the submission.

The library calls that load torch are imported in the task bodies: every retrain run imports
this module, and a run that trains nothing (a nightly on unchanged data, a superseded push, data
that fails validation) would otherwise spend 1.5-2.5 s of its start loading torch and torchvision.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from protein.links import object_uri
from protein.modeling.devices import DevicePolicy
from protein.storage import open_store
from tasks import events
from tasks.retry import retry_transient
from tasks.training import device_for


@task(name="predict-test-set", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def predict_submission(data: str, store: str, model_id: str | list[str] = "champion",
                       as_champion: bool = False, expected_fingerprint: str | None = None) -> dict[str, Any]:
    """``as_champion``: a retrain's champion, which moves submissions/latest.json only while it
    still is (protein.pipeline.publish_submission); ``expected_fingerprint``: the data it validated."""
    from protein.pipeline import predict_and_publish

    result = predict_and_publish(data, store, model_id, as_champion=as_champion,
                                 expected_fingerprint=expected_fingerprint)
    announce_submission(store, result)
    return result


@task(name="predict-test-set-into-store", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def predict_submission_for_run(data: str, store: str, run_id: str, model_id: str,
                               policy: DevicePolicy) -> dict[str, Any]:
    """The test set predicted on the host that runs the score deployment (the GPU's) and kept
    under the run; the retrain run publishes it."""
    from protein.run_results import predict_for_run

    device = device_for("auto", policy)
    get_run_logger().info("predicting the test set with %s on %s (run %s)", model_id, device, run_id)
    return predict_for_run(data, store, run_id, model_id, device)


@task(name="publish-submission", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def publish_submission_of_run(data: str, store: str, run_id: str, model_id: str,
                              data_fingerprint: str) -> dict[str, Any]:
    """The submission the score deployment computed for this run, derived again from its
    probabilities and spot-checked here, then published."""
    from protein.run_results import publish_run_submission

    result = publish_run_submission(data, store, run_id, model_id, data_fingerprint)
    announce_submission(store, result)
    return result


def announce_submission(store: str, result: dict[str, Any]) -> None:
    # The durable URI, never a presigned URL: `protein link URI` makes an openable link on demand.
    uri = object_uri(open_store(store), result["key"])
    create_link_artifact(uri, link_text=f"submission.csv ({result['rows']} rows, model {result['model_id']})",
                         key="submission", description=f"test-set submission; open with `protein link {uri}`")
    events.submission_written(uri, result["model_id"], result["rows"])
