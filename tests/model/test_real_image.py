import shutil

import numpy as np
import pandas as pd

from protein.data import fingerprint, load_competition
from protein.evaluation.metrics import binarize
from protein.labels import format_label_set
from protein.pipeline import predict_and_publish
from protein.pipeline.inputs import load_split_images
from protein.pipeline.prediction import load_predictor
from protein.registry import Registry
from protein.storage import open_store
from tests.helpers import REAL


def test_real_test_image_flows_through_predict(trained, tmp_path):
    """The one real competition image (512x512 RGB) through the same path as `protein predict`."""
    dataset = tmp_path / "real-one"
    shutil.copytree(trained["data"], dataset)
    shutil.rmtree(dataset / "test")
    (dataset / "test").mkdir()
    shutil.copy(REAL / "test" / "10034.png", dataset / "test" / "10034.png")
    (dataset / "sample_submission.csv").write_text("Image,Label\n10034,0\n")

    store = tmp_path / "store"
    registry = Registry(open_store(str(store)))
    registry.import_version(Registry(open_store(trained["store"])), trained["model_id"])
    registry.promote(trained["model_id"], expected_champion=None)
    out = tmp_path / "submission.csv"
    predict_and_publish(dataset, str(store), "champion", out, tmp_path / "cache")
    submission = pd.read_csv(out, dtype=str)
    assert submission["Image"].tolist() == ["10034"]
    # The labels are the champion's: its probabilities for this image, cut at its thresholds (at least
    # one label per image), as label ids in order.
    data = load_competition(dataset)
    predictor = load_predictor(registry, trained["model_id"], tmp_path / "cache")
    images = load_split_images(data, "test", predictor.image_size, fingerprint(data.source), tmp_path / "cache")
    assert images.shape[0] == 1 and images.std() > 0  # the real image's pixels, not a blank
    predicted = binarize(predictor.predict_probs(images), predictor.thresholds, ensure_one=True)[0]
    assert submission["Label"].iloc[0] == format_label_set(np.flatnonzero(predicted))
