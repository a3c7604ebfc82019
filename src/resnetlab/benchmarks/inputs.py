"""The synthetic inputs the benchmarks share: random images, and a data set that hands them
out one PIL image at a time as torchvision's data sets do."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


class PILDataset(Dataset):
    """Images handed out one at a time as PIL images, as torchvision's data sets do."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        return self.transform(pil), int(self.labels[i])


def synthetic_arrays(n: int, chans: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images (N, H, W, C) and labels in 0..9, the same on every call."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, size, size, chans), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))
