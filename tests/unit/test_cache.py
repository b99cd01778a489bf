import numpy as np

from protein.cache import CacheKey, ImageCache
from protein.data import fingerprint, load_competition, load_image
from tests.helpers import write_dataset, write_png


def test_cached_pixels_equal_a_fresh_decode(tmp_path):
    root = write_dataset(tmp_path / "ds", {str(i): str(i % 10) for i in range(70)}, ["100"], size=48)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")
    images = cache.build(data, "train", 32, workers=2)  # 70 images: two chunks, two processes
    assert images.shape == (70, 32, 32, 3)
    for i in (0, 33, 69):
        fresh = load_image((root / "train" / f"{i}.png").read_bytes(), "x", 32)
        np.testing.assert_array_equal(images[i], fresh)
    single = ImageCache(tmp_path / "cache1").build(data, "train", 32, workers=1)
    np.testing.assert_array_equal(np.asarray(images), np.asarray(single))


def test_changed_image_invalidates_the_cache(tmp_path):
    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    cache = ImageCache(tmp_path / "cache")
    data = load_competition(root)
    first = np.array(cache.build(data, "train", 16))
    key = CacheKey(fingerprint(data.source), "train", 16)
    assert cache.load(key, data.train_ids) is not None

    write_png(root / "train" / "2.png", size=16, seed=1234)
    data = load_competition(root)
    assert CacheKey(fingerprint(data.source), "train", 16) != key
    second = np.array(cache.build(data, "train", 16))
    np.testing.assert_array_equal(second[0], first[0])
    assert not np.array_equal(second[1], first[1])
    np.testing.assert_array_equal(second[1], load_image((root / "train" / "2.png").read_bytes(), "x", 16))


def test_cache_with_other_ids_is_not_reused(tmp_path):
    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4"}, ["9"], size=16)
    data = load_competition(root)
    cache = ImageCache(tmp_path / "cache")
    key = CacheKey("same", "train", 16)
    cache.build(data, "train", 16, key=key)
    assert cache.load(key, ["2", "1"]) is None


def test_cache_is_shared_through_the_store(tmp_path, monkeypatch):
    from protein.storage import open_store

    root = write_dataset(tmp_path / "ds", {"1": "0", "2": "4", "3": "6"}, ["9"], size=16)
    data = load_competition(root)
    store = open_store(str(tmp_path / "store"))
    built = np.array(ImageCache(tmp_path / "worker-a").build(data, "train", 16, shared=store))
    key = CacheKey(fingerprint(data.source), "train", 16)
    assert store.exists(f"cache/{key.name}.npy") and store.exists(f"cache/{key.name}.json")

    # Another worker pulls instead of decoding: make decoding impossible to prove it.
    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the store had the cache")

    monkeypatch.setattr("protein.cache.decode_all", no_decode)
    pulled = ImageCache(tmp_path / "worker-b").build(data, "train", 16, shared=store)
    np.testing.assert_array_equal(np.asarray(pulled), built)
