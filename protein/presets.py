"""Named preprocessing presets, defined once and shared by training, evaluation and prediction,
so preprocessing cannot drift between training and serving.

Images arrive as uint8 NHWC batches already resized by `protein.data.load_image`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Per-channel statistics of the real competition images (shared/data/README.md).
IMAGE_MEAN: tuple[float, float, float] = (0.079, 0.053, 0.054)
IMAGE_STD: tuple[float, float, float] = (0.129, 0.088, 0.137)


@dataclass(frozen=True)
class EvalPreset:
    mean: tuple[float, float, float] = IMAGE_MEAN
    std: tuple[float, float, float] = IMAGE_STD
    channels_last: bool = False

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 on any device -> (N, 3, H, W) normalised float32."""
        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std
        if self.channels_last:
            return x.contiguous(memory_format=torch.channels_last)
        return x.contiguous()


@dataclass(frozen=True)
class TrainPreset(EvalPreset):
    """Eval preprocessing plus the augmentation microscopy allows: the 8 symmetries of the
    square (flips and 90-degree rotations), since a cell has no up or down. Done as tensor
    ops on the whole batch, on whatever device the batch is on."""

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return super().__call__(dihedral_augment(batch, generator))


def dihedral_augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply one of the 8 dihedral transforms, chosen per image, to an (N, H, W, C) batch."""
    n = batch.shape[0]
    ops = torch.randint(0, 8, (n,), generator=generator)
    out = batch.clone()
    for op in range(1, 8):
        idx = (ops == op).nonzero().flatten().to(batch.device)
        if idx.numel() == 0:
            continue
        x = batch.index_select(0, idx)
        if op & 4:
            x = x.flip(2)
        x = torch.rot90(x, op & 3, dims=(1, 2))
        out.index_copy_(0, idx, x)
    return out
