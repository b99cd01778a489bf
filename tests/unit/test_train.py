import numpy as np
import pytest
import torch

from protein.train import iterate_batches, prefetch


def test_prefetch_keeps_order_and_reraises_producer_errors():
    assert list(prefetch(iter(range(10)), depth=2)) == list(range(10))

    def broken():
        yield 1
        raise ValueError("corrupt batch")

    with pytest.raises(ValueError, match="corrupt batch"):
        list(prefetch(broken()))


def test_iterate_batches_covers_each_index_once_in_seeded_order():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1).repeat(3, axis=3)
    targets = np.eye(10, dtype=np.float32)
    indices = np.array([0, 2, 3, 5, 7, 9])
    first = [x[:, 0, 0, 0].tolist() for x, _ in iterate_batches(images, targets, indices, 4,
                                                                  torch.Generator().manual_seed(1))]
    again = [x[:, 0, 0, 0].tolist() for x, _ in iterate_batches(images, targets, indices, 4,
                                                                  torch.Generator().manual_seed(1))]
    assert first == again and [len(b) for b in first] == [4, 2]
    assert sorted(v for b in first for v in b) == indices.tolist()
    for x, y in iterate_batches(images, targets, indices, 4):
        assert (y.argmax(1).numpy() == x[:, 0, 0, 0].numpy()).all()  # labels travel with their images
