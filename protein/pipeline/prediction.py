"""The test set's submission from one version or an ensemble, and its publication."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from protein.atomic import write_bytes_atomic
from protein.cache_budget import enforce_cache_budget, max_cache_bytes, touch
from protein.data import fingerprint, load_competition
from protein.errors import PreconditionFailed, ProteinError, StoreError
from protein.locations import default_cache_dir
from protein.modeling.ensemble import ensemble_id, ensemble_thresholds, spec_uri
from protein.modeling.predict import Predictor, check_inference_fields, label_strings
from protein.pipeline.inputs import check_fingerprint, load_split_images
from protein.registry import Registry, check_version_id
from protein.storage import Store, open_store

log = logging.getLogger(__name__)


def load_predictor(registry: Registry, model_id: str, cache_dir: Path | None = None,
                   device: str = "auto") -> Predictor:
    root = cache_dir or default_cache_dir()
    max_cache_bytes()  # a bad bound fails now, not after the download it would have bounded
    local = registry.download(model_id, root / "models")
    touch(local)
    enforce_cache_budget(root, keep=[f"models/{local.name}"])
    return Predictor.from_checkpoint(local, device)


@dataclass(frozen=True)
class TestSetPrediction:
    """A submission computed but not yet published."""

    model_id: str  # the version, or ensemble-<hash> for several
    csv_bytes: bytes
    data_fingerprint: str
    extra: dict[str, Any]  # an ensemble's members and thresholds
    probs: np.ndarray | None = None  # (test rows, C) of one version: the evidence a CPU host checks


def submission_csv(image_ids: list[str], probs: np.ndarray, thresholds: np.ndarray) -> bytes:
    """The submission's bytes from probabilities: the one way, so a CPU host that derives the CSV
    from a GPU host's probabilities gets the same bytes."""
    frame = pd.DataFrame({"Image": image_ids, "Label": label_strings(probs, thresholds)})
    return frame.to_csv(index=False, lineterminator="\n").encode()


def predict_test_set(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str | Sequence[str] = "champion",
    cache_dir: Path | None = None,
    device: str = "auto",
    expected_fingerprint: str | None = None,
) -> TestSetPrediction:
    """The test set's submission CSV from one version, or from several as an ensemble: the mean
    of their (test-time-augmented) probabilities. ``expected_fingerprint``: the data a retrain
    validated (FingerprintMismatch when the data changed since)."""
    registry = Registry(open_store(store_uri))
    requested = [model_id] if isinstance(model_id, str) else list(model_id)
    # Bad input, exit 2: a ValueError was retried by the predict task (tasks/retry.py) and then exited 1.
    if not requested:
        raise ProteinError("predict needs at least one model version")
    model_ids = [registry.resolve(m) for m in requested]
    if twice := sorted({m for m in model_ids if model_ids.count(m) > 1}):
        champion = f" ('champion' is {model_ids[requested.index('champion')]})" if "champion" in requested else ""
        raise ProteinError(f"the models {requested} name version {', '.join(twice)} twice{champion}; an ensemble "
                           "names each version once")
    data = load_competition(data_path, require_test=True, cache_dir=cache_dir)
    data_fingerprint = fingerprint(data.source)
    check_fingerprint(str(data_path), data_fingerprint, expected_fingerprint, "nothing predicted")
    if len(model_ids) == 1:
        predictor = load_predictor(registry, model_ids[0], cache_dir, device)
        images = load_split_images(data, "test", predictor.image_size, data_fingerprint, cache_dir)
        probs = predictor.predict_probs(images)
        return TestSetPrediction(model_ids[0], submission_csv(data.test_ids, probs, predictor.thresholds),
                                 data_fingerprint, {}, probs)

    for member in model_ids:  # before their thresholds are averaged, not only when each is loaded
        check_inference_fields(registry.spec(member), spec_uri(registry, member))
    thresholds, threshold_info = ensemble_thresholds(registry, model_ids, data, data_fingerprint)
    total: np.ndarray | None = None
    for member in model_ids:  # one member in memory at a time
        predictor = load_predictor(registry, member, cache_dir, device)
        images = load_split_images(data, "test", predictor.image_size, data_fingerprint, cache_dir)
        probs = predictor.predict_probs(images)
        total = probs if total is None else total + probs
    assert total is not None
    return TestSetPrediction(ensemble_id(model_ids), submission_csv(data.test_ids, total / len(model_ids), thresholds),
                             data_fingerprint, {"members": model_ids, "thresholds": [float(t) for t in thresholds],
                                                "thresholds_from": threshold_info})


def predict_and_publish(
    data_path: str | os.PathLike[str],
    store_uri: str,
    model_id: str | Sequence[str] = "champion",
    out: Path | None = None,
    cache_dir: Path | None = None,
    device: str = "auto",
    as_champion: bool = False,
    expected_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Predict the test set and write submissions/<model>/<utc>/submission.csv plus
    submissions/latest.json to the store (and `out` locally when given). Several versions make
    an ensemble, published under submissions/ensemble-<hash>/. ``as_champion``: see
    `publish_submission`."""
    prediction = predict_test_set(data_path, store_uri, model_id, cache_dir, device, expected_fingerprint)
    return publish_submission(open_store(store_uri), prediction.model_id, prediction.csv_bytes,
                              prediction.data_fingerprint, out, prediction.extra, as_champion)


LATEST_SUBMISSION = "submissions/latest.json"
LATEST_ATTEMPTS = 5


def publish_submission(
    store: Store, model_id: str, csv_bytes: bytes, data_fingerprint: str, out: Path | None = None,
    extra: dict[str, Any] | None = None, as_champion: bool = False,
) -> dict[str, Any]:
    """Store the submission under its own key and point submissions/latest.json at it. With
    ``as_champion`` (a retrain publishing the champion it read) latest.json moves only while
    ``model_id`` is still the champion; ``pointer["latest"]`` says whether it moved."""
    stamp = f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%fZ}"
    key = f"submissions/{check_version_id(model_id)}/{stamp}/submission.csv"
    # The local copy first: a path that cannot be written must fail before latest.json points others
    # at a submission whose command then reported an error.
    if out is not None:
        write_bytes_atomic(Path(out), csv_bytes)
    store.put_bytes(key, csv_bytes, content_type="text/csv")
    # extra adds fields (an ensemble's members and thresholds); it never replaces those written here.
    pointer = {**(extra or {}), "model_id": model_id, "key": key, "uri": f"{store.uri.rstrip('/')}/{key}",
               "data_fingerprint": data_fingerprint, "created": stamp, "rows": csv_bytes.count(b"\n") - 1}
    body = json.dumps(pointer, indent=2).encode()
    if as_champion:
        pointer["latest"] = point_latest_at_champion(store, model_id, body)
    else:
        store.put_bytes(LATEST_SUBMISSION, body)
        pointer["latest"] = True
    if out is not None:
        pointer["local_path"] = str(Path(out).resolve())
    return pointer


def point_latest_at_champion(store: Store, model_id: str, body: bytes) -> bool:
    """Write latest.json only while ``model_id`` is the champion. Two retrains overlap: the one that
    read the champion before the other promoted its own publishes last, and pointed latest.json back
    at the old champion. The pointer's etag is read before the champion and the write is
    conditional on it, so a publication in between (by a run that saw a newer champion) makes this
    one read both again. False: the champion moved on; the submission stays under its own key."""
    registry = Registry(store)
    for _ in range(LATEST_ATTEMPTS):
        etag = store.etag(LATEST_SUBMISSION)
        if registry.champion().champion != model_id:
            log.info("submissions/latest.json left as it is: %s is no longer the champion", model_id)
            return False
        try:
            if etag is None:
                store.put_bytes(LATEST_SUBMISSION, body, if_none_match=True)
            else:
                store.put_bytes(LATEST_SUBMISSION, body, if_match=etag)
            return True
        except PreconditionFailed:
            continue
    raise StoreError(f"{store.uri.rstrip('/')}/{LATEST_SUBMISSION}: rewritten by others {LATEST_ATTEMPTS} times "
                     f"while this run published {model_id}; not moved")
