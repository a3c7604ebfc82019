"""In-memory batches with whole-batch augmentation (paper sec. 4.2: pad 4, random crop, flip).

The split lives as one uint8 tensor; a batch is gathered, augmented and normalised with a
few tensor ops, so the loader costs a small fraction of a training step. Every random
choice comes from a generator seeded by (seed, epoch, batch): an epoch is the same whoever
draws it, and a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .sources import ArrayDataset


def batch_generator(seed: int, epoch: int, batch: int = -1) -> torch.Generator:
    """A generator whose stream depends only on (seed, epoch, batch)."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_033 + batch)
                                         % (2**63 - 1))


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=batch_generator(seed, epoch))


class BatchAugment:
    """Random crop of the zero-padded image (`pad` pixels a side) and a horizontal flip."""

    def __init__(self, pad: int = 4, flip: bool = True) -> None:
        self.pad, self.flip = pad, flip

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.pad:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b, 1), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (b, 1), generator=gen)
            rows = (dy + torch.arange(h)).unsqueeze(2)  # (B, H, 1)
            cols = (dx + torch.arange(w)).unsqueeze(1)  # (B, 1, W)
            x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        if self.flip:
            mask = torch.rand(b, generator=gen) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        return x.contiguous()


class Normalize:
    """Subtract a mean (per channel, or per pixel as in the paper) and divide by a std."""

    def __init__(self, mean: Sequence, std: Sequence[float]) -> None:
        m = torch.tensor(mean, dtype=torch.float32)
        self.mean = m.view(-1, 1, 1) if m.ndim == 1 else m
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    @classmethod
    def fit(cls, images: torch.Tensor, mode: str) -> Normalize:
        """Statistics of a uint8 training split scaled to [0, 1]."""
        x = images.float().div_(255)
        std = x.std(dim=(0, 2, 3)).tolist()
        if mode == "pixel":  # paper: "per-pixel mean subtracted"; unit std keeps the scale sane
            return cls(x.mean(0).tolist(), std)
        if mode == "channel":
            return cls(x.mean(dim=(0, 2, 3)).tolist(), std)
        raise ValueError(f"normalize must be 'channel' or 'pixel', got {mode!r}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean).div_(self.std)

    def as_lists(self) -> tuple[list, list[float]]:
        mean = self.mean.flatten().tolist() if self.mean.shape[1:] == (1, 1) else \
            self.mean.tolist()
        return mean, self.std.flatten().tolist()


def shard(n: int, rank: int, world: int) -> range:
    """A rank's contiguous share of n items: no padding, so nothing is counted twice."""
    per = -(-n // world)
    return range(min(n, rank * per), min(n, (rank + 1) * per))


class InMemoryLoader:
    """Batches of a whole-tensor split; `batches(epoch, start)` resumes mid-epoch.

    With `world` > 1 (data-parallel training) a shuffled loader still draws and augments
    the global batch of `batch_size` examples, and yields this rank's contiguous slice of
    it, so N ranks see exactly the examples one process would; an evaluation loader
    (shuffle=False) walks this rank's contiguous shard of the split.
    """

    def __init__(
        self,
        data: ArrayDataset,
        batch_size: int,
        normalize: Normalize,
        augment: BatchAugment | None = None,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if shuffle and batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes")
        self.data, self.batch_size, self.normalize = data, batch_size, normalize
        self.augment, self.shuffle, self.drop_last = augment, shuffle, drop_last
        self.seed, self.channels_last, self.rank, self.world = seed, channels_last, rank, world

    def _size(self) -> int:
        return len(self.data) if self.shuffle else len(shard(len(self.data), self.rank,
                                                             self.world))

    def __len__(self) -> int:
        n, b = self._size(), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.data)
        if self.shuffle:
            order = epoch_permutation(n, self.seed, epoch)
        else:
            part = shard(n, self.rank, self.world)
            order = torch.arange(part.start, part.stop)
        local = self.batch_size // self.world if self.shuffle else self.batch_size
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            x, y = self.data.images[idx], self.data.labels[idx]
            if self.augment is not None:
                x = self.augment(x, batch_generator(self.seed, epoch, i))
            if self.shuffle and self.world > 1:
                mine = slice(self.rank * local, (self.rank + 1) * local)
                x, y = x[mine], y[mine]
            x = self.normalize(x)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y
