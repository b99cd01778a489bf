"""The baseline data path of the course notebooks, kept only to measure against: a torch
Dataset whose __getitem__ opens the PNG with PIL and runs torchvision transforms on it, every
epoch, behind a DataLoader with worker processes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from protein.data import TRAIN_DIR, CompetitionData
from protein.modeling.presets import IMAGE_MEAN, IMAGE_STD


class NaivePngDataset(Dataset):
    """Item i -> ((3, S, S) normalised float32, (C,) float32 targets), decoded from PNG each time."""

    def __init__(self, folder: Path, image_ids: Sequence[str], targets: np.ndarray, image_size: int) -> None:
        import torchvision.transforms as T

        self.folder = Path(folder)
        self.image_ids = list(image_ids)
        self.targets = targets
        # The notebooks' recipe, minus the crops: flip stands in for their augmentation, and the
        # normalisation makes the output the same kind of tensor TrainPreset produces.
        self.transform = T.Compose([
            T.Resize(image_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGE_MEAN, IMAGE_STD),
        ])

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = Image.open(self.folder / f"{self.image_ids[index]}.png").convert("RGB")
        return self.transform(image), torch.from_numpy(self.targets[index])


def naive_dataset(data: CompetitionData, dataset_dir: Path, image_size: int) -> NaivePngDataset:
    return NaivePngDataset(Path(dataset_dir) / TRAIN_DIR, data.train_ids, data.targets, image_size)


def naive_loader(
    dataset: NaivePngDataset,
    batch_size: int,
    num_workers: int,
    num_samples: int | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """One shuffled epoch, as the notebooks iterate it; with num_samples, a stream of that many
    images drawn with replacement, so a long timed run never pays for restarting workers."""
    sampler = RandomSampler(dataset, replacement=num_samples is not None, num_samples=num_samples)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=pin_memory, drop_last=num_samples is not None)
