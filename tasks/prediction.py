from __future__ import annotations

from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE

from protein.links import object_uri
from protein.pipeline import predict_and_publish
from protein.storage import open_store
from tasks import events
from tasks.retry import retry_transient


@task(name="predict-test-set", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_transient,
      timeout_seconds=3600, cache_policy=NO_CACHE)
def predict_submission(data: str, store: str, model_id: str | list[str] = "champion") -> dict[str, Any]:
    result = predict_and_publish(data, store, model_id)
    # The durable URI, never a presigned URL: `protein link URI` makes an openable link on demand.
    uri = object_uri(open_store(store), result["key"])
    create_link_artifact(uri, link_text=f"submission.csv ({result['rows']} rows, model {result['model_id']})",
                         key="submission", description=f"test-set submission; open with `protein link {uri}`")
    events.submission_written(uri, result["model_id"], result["rows"])
    return result
