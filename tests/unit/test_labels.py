import numpy as np
import pytest

from protein.labels import LABELS, NUM_CLASSES, decode, encode, encode_many, format_label_set, parse_label_set


def test_ten_named_classes():
    assert NUM_CLASSES == 10
    assert LABELS[0] == "Mitochondria" and LABELS[4] == "Nucleoplasm" and LABELS[9] == "Nuclear speckles"


@pytest.mark.parametrize("text,expected", [("4", {4}), ("6 4", {4, 6}), ("0 9 3", {0, 3, 9}), (" 2 ", {2})])
def test_parse_label_set_accepts_sets_in_any_order(text, expected):
    assert parse_label_set(text) == frozenset(expected)


@pytest.mark.parametrize("text,needle", [("", "empty"), ("10", "0-9"), ("-1", "integer"), ("a", "integer"),
                                         ("1 1", "once"), ("1  2", "single spaces"), ("1.0", "integer"),
                                         ("١", "integer")])
def test_parse_label_set_rejects_with_reason(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_label_set(text)


def test_encode_decode_round_trip():
    vector = encode({6, 4})
    assert vector.dtype == np.float32 and vector.tolist() == [0, 0, 0, 0, 1, 0, 1, 0, 0, 0]
    assert decode(vector) == "4 6"
    assert format_label_set([9, 0, 9]) == "0 9"
    assert encode_many([{1}, {2, 3}]).shape == (2, 10)
    assert encode_many([]).shape == (0, 10)
