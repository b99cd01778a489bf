"""The ten localization classes and the one way to encode and decode label sets."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

LABELS: tuple[str, ...] = (
    "Mitochondria",
    "Nuclear bodies",
    "Nucleoli",
    "Golgi apparatus",
    "Nucleoplasm",
    "Nucleoli fibrillar center",
    "Cytosol",
    "Plasma membrane",
    "Centrosome",
    "Nuclear speckles",
)
NUM_CLASSES = len(LABELS)


def parse_label_set(text: str) -> frozenset[int]:
    """Parse a competition label cell ("6 4") into a set of class ids.

    Labels are a set: order is free, but each id is an integer in 0-9, separated by single
    spaces, and appears once. Raises ValueError saying what was expected.
    """
    if not isinstance(text, str) or text.strip() == "":
        raise ValueError("expected one or more class ids 0-9 separated by spaces, got an empty label")
    parts = text.strip().split(" ")
    ids: list[int] = []
    for part in parts:
        if part == "":
            raise ValueError(f"expected class ids separated by single spaces, got {text!r}")
        if not part.isdigit() or not part.isascii():
            raise ValueError(f"expected integer class ids 0-9, got {part!r} in {text!r}")
        value = int(part)
        if value >= NUM_CLASSES:
            raise ValueError(f"expected class ids 0-{NUM_CLASSES - 1}, got {value} in {text!r}")
        ids.append(value)
    if len(set(ids)) != len(ids):
        raise ValueError(f"expected each class id once, got a repeated id in {text!r}")
    return frozenset(ids)


def encode(label_set: Iterable[int]) -> np.ndarray:
    """Label set -> multi-hot float32 vector of length NUM_CLASSES."""
    vector = np.zeros(NUM_CLASSES, dtype=np.float32)
    for class_id in label_set:
        vector[class_id] = 1.0
    return vector


def encode_many(label_sets: Iterable[Iterable[int]]) -> np.ndarray:
    rows = [encode(s) for s in label_sets]
    return np.stack(rows) if rows else np.zeros((0, NUM_CLASSES), dtype=np.float32)


def format_label_set(label_set: Iterable[int]) -> str:
    """Class ids -> the submission form: ascending, space-separated."""
    return " ".join(str(i) for i in sorted(set(int(i) for i in label_set)))


def decode(multi_hot: np.ndarray) -> str:
    """Multi-hot (or boolean) vector -> submission label string."""
    return format_label_set(np.flatnonzero(np.asarray(multi_hot) > 0.5))
