"""Named preprocessing presets, defined once and shared by training, evaluation and prediction,
so preprocessing cannot drift between training and serving.

Images arrive as uint8 NHWC batches already resized by `protein.data.load_image`. Each preset
writes its float NCHW output in one pass (uint8 -> float conversion, HWC -> CHW transpose and,
for training, the dihedral transform happen in a single copy into a preallocated tensor),
followed by one in-place multiply-add for the normalisation: on the CPU this is 3-7x faster
than a chain of full-size float ops (bench/data_path.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Per-channel statistics of the real competition images (shared/data/README.md).
IMAGE_MEAN: tuple[float, float, float] = (0.079, 0.053, 0.054)
IMAGE_STD: tuple[float, float, float] = (0.129, 0.088, 0.137)


def dihedral(image: torch.Tensor, op: int) -> torch.Tensor:
    """One of the 8 symmetries of the square on an (H, W, C) image: bit 2 flips left-right,
    bits 0-1 rotate by 90 degrees that many times. Returns a view where possible."""
    if op & 4:
        image = image.flip(1)
    if op & 3:
        image = torch.rot90(image, op & 3, dims=(0, 1))
    return image


def draw_dihedral_ops(n: int, generator: torch.Generator | None = None) -> list[int]:
    return torch.randint(0, 8, (n,), generator=generator).tolist()


def dihedral_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms, chosen per image, to an (N, H, W, C) batch
    (the same draw TrainPreset makes)."""
    ops = draw_dihedral_ops(batch.shape[0], generator)
    return torch.stack([dihedral(image, op) for image, op in zip(batch, ops, strict=True)])


@dataclass(frozen=True)
class EvalPreset:
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD
    channels_last: bool = False

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on any device -> (N, 3, H, W) normalised float32."""
        out = self._empty(batch)
        out.copy_(batch.permute(0, 3, 1, 2))
        return self._normalize_(out)

    def _empty(self, batch: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = batch.shape
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.empty((n, 3, h, w), dtype=torch.float32, device=batch.device, memory_format=memory_format)

    def _normalize_(self, out: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std == x * scale + shift, in place.
        scale, shift = normalization_constants(self.mean, self.std, out.device)
        return out.mul_(scale).add_(shift)


@functools.lru_cache(maxsize=16)
def normalization_constants(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) as (1, 3, 1, 1) tensors, built once per device: creating them per batch
    copied host memory to the GPU at every step."""
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    return (1.0 / (255.0 * std_t)).to(device), (-mean_t / std_t).to(device)


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square of an (N, C, H, W) batch, identity first (test-time
    augmentation: the same 8 transforms training draws from)."""
    views = []
    for op in range(8):
        view = x.flip(3) if op & 4 else x
        views.append(torch.rot90(view, op & 3, dims=(2, 3)) if op & 3 else view)
    return views


def jitter_brightness_contrast_(out: torch.Tensor, amount: float,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """In place on an (N, C, H, W) float batch in [0, 255]: per image, scale the contrast around
    the image's mean and then the brightness by factors drawn from [1 - amount, 1 + amount]
    (stain intensity and exposure vary between fields), clamped back to [0, 255]. The factors are
    drawn on the batch's device (with `generator` when it is on that device, else the device's
    default generator): drawing them on the host copied them to the GPU at every step."""
    n = out.shape[0]
    on_device = generator is not None and generator.device == out.device
    uniform = torch.rand((2, n, 1, 1, 1), generator=generator if on_device else None, device=out.device)
    contrast, brightness = 1.0 + amount * (2.0 * uniform - 1.0)  # (2, N, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return out.sub_(mean).mul_(contrast).add_(mean).mul_(brightness).clamp_(0.0, 255.0)


@dataclass(frozen=True)
class TrainPreset(EvalPreset):
    """Eval preprocessing plus the augmentation microscopy allows: the 8 symmetries of the
    square (flips and 90-degree rotations), since a cell has no up or down, and optionally a
    per-image brightness/contrast jitter. Runs on whatever device the batch is on.

    `generator` (a CPU generator) draws which symmetry each image gets: that choice picks the
    copy to run, so it is made on the host. `device_generator` (on the batch's device) draws the
    jitter factors; without it they come from `generator` on a CPU batch, else from the device's
    default generator."""

    jitter: float = 0.0

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None,
                 device_generator: torch.Generator | None = None) -> torch.Tensor:
        out = self._empty(batch)
        for i, op in enumerate(draw_dihedral_ops(batch.shape[0], generator)):
            out[i].copy_(dihedral(batch[i], op).permute(2, 0, 1))
        if self.jitter > 0:
            jitter_brightness_contrast_(out, self.jitter, device_generator or generator)
        return self._normalize_(out)
