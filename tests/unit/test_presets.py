import torch

from protein.presets import IMAGE_MEAN, IMAGE_STD, EvalPreset, TrainPreset, dihedral_augment


def test_eval_preset_normalises_to_nchw():
    batch = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    x = EvalPreset()(batch)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    expected = (1.0 - IMAGE_MEAN[2]) / IMAGE_STD[2]
    assert torch.allclose(x[:, 2], torch.full((2, 4, 4), expected))


def test_dihedral_augment_only_permutes_pixels_and_covers_all_eight():
    base = torch.arange(16, dtype=torch.uint8).view(1, 4, 4, 1)
    batch = base.repeat(256, 1, 1, 1)
    out = dihedral_augment(batch, torch.Generator().manual_seed(0))
    # Every output is one of the 8 symmetries of the square, and all 8 occur.
    variants = set()
    for image in out:
        assert sorted(image.flatten().tolist()) == list(range(16))
        variants.add(tuple(image.flatten().tolist()))
    assert len(variants) == 8


def test_train_preset_is_seeded():
    batch = torch.randint(0, 255, (8, 8, 8, 3), dtype=torch.uint8)
    a = TrainPreset()(batch, torch.Generator().manual_seed(3))
    b = TrainPreset()(batch, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_train_preset_equals_augment_then_eval():
    batch = torch.randint(0, 255, (16, 12, 12, 3), dtype=torch.uint8)
    for channels_last in (False, True):
        fused = TrainPreset(channels_last=channels_last)(batch, torch.Generator().manual_seed(5))
        reference = EvalPreset()(dihedral_augment(batch, torch.Generator().manual_seed(5)))
        assert torch.allclose(fused, reference, atol=1e-5)
        assert fused.is_contiguous(memory_format=torch.channels_last) == channels_last

