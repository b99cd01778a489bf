import torch

from protein.modeling.presets import (
    IMAGE_MEAN,
    IMAGE_STD,
    EvalPreset,
    TrainPreset,
    dihedral,
    dihedral_augment,
    dihedral_views,
    jitter_brightness_contrast_,
)


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



def test_dihedral_views_are_the_eight_symmetries_identity_first():
    x = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    views = dihedral_views(x)
    assert torch.equal(views[0], x) and len(views) == 8
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    # The same 8 transforms training draws from (on NHWC images).
    nhwc = x.permute(0, 2, 3, 1)[0]
    assert {tuple(v.flatten().tolist()) for v in views} == {
        tuple(dihedral(nhwc, op).flatten().tolist()) for op in range(8)}


def test_jitter_scales_contrast_and_brightness_per_image():
    batch = torch.tensor([[[[50.0, 150.0]]], [[[100.0, 100.0]]]])  # (2, 1, 1, 2)
    out = jitter_brightness_contrast_(batch.clone(), 0.5, torch.Generator().manual_seed(0))
    factors = 1.0 + 0.5 * (2.0 * torch.rand((2, 2, 1, 1, 1), generator=torch.Generator().manual_seed(0)) - 1.0)
    contrast, brightness = factors
    expected_0 = ((torch.tensor([50.0, 150.0]) - 100.0) * contrast[0].flatten() + 100.0) * brightness[0].flatten()
    assert torch.allclose(out[0].flatten(), expected_0.clamp(0, 255))
    assert torch.allclose(out[1].flatten(), (100.0 * brightness[1]).flatten().expand(2))  # flat image: brightness only
    assert not torch.equal(out, batch)


def test_train_preset_jitter_is_seeded_and_off_by_default():
    batch = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8)
    a = TrainPreset(jitter=0.2)(batch, torch.Generator().manual_seed(1))
    b = TrainPreset(jitter=0.2)(batch, torch.Generator().manual_seed(1))
    plain = TrainPreset()(batch, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, plain)
