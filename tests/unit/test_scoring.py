import pytest

from protein.errors import DataError
from protein.evaluation.scoring import score_submission


def write(path, rows):
    path.write_text("Image,Label\n" + "".join(f"{i},{label}\n" for i, label in rows))
    return path


def test_scores_a_submission_in_any_order_against_the_truth(tmp_path):
    truth = write(tmp_path / "truth.csv", [("1", "0"), ("2", "4 6"), ("3", "4")])
    submission = write(tmp_path / "sub.csv", [("3", "4"), ("1", "0"), ("2", "6")])
    train = write(tmp_path / "train.csv", [("7", "4"), ("8", "4 6"), ("9", "4")])
    scores = score_submission(submission, truth, train)
    # Per image F1: 1, 2*1/(1+2)=0.667, 1 -> mean 0.889.
    assert scores["model"]["f1_samples"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    # The prior predicts Nucleoplasm (frequency 1.0 > 0.5) and Cytosol is 1/3 < 0.5: {4} for everyone.
    assert scores["prior_baseline"]["f1_samples"] == pytest.approx((0 + 2 / 3 + 1) / 3)


def test_mismatched_ids_are_named(tmp_path):
    truth = write(tmp_path / "truth.csv", [("1", "0"), ("2", "4")])
    submission = write(tmp_path / "sub.csv", [("1", "0"), ("5", "4")])
    with pytest.raises(DataError, match=r"missing \['2'\], unexpected \['5'\]"):
        score_submission(submission, truth)
