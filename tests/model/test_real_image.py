import shutil

import pandas as pd

from protein.pipeline import predict_and_publish
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
    labels = submission["Label"].iloc[0].split(" ")
    assert labels and all(label.isdigit() and 0 <= int(label) <= 9 for label in labels)
