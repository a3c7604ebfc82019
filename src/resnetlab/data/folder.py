"""Folders of images in the ImageNet layout (`root/train/<class>/*.jpg`, `root/val/<class>/`).
data/scan.py checks a folder before these read it.

Decoding and augmentation run in DataLoader workers with torchvision.transforms.v2.
Training follows paper sec. 3.4: shorter side random in [256, 480], random 224 crop,
horizontal flip, AlexNet's PCA colour augmentation, mean/std normalisation; evaluation
resizes the shorter side to 256 and takes the centre 224.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .images import ImageError, load_image
from .memory import epoch_permutation, shard
from .sources import DataError

log = logging.getLogger(__name__)

# AlexNet (Krizhevsky et al. 2012) PCA of ImageNet RGB pixels, as used by fb.resnet.torch.
PCA_EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
PCA_EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                           [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])


class Lighting(torch.nn.Module):
    """Add sum_i alpha_i * eigval_i * eigvec_i to every pixel, alpha ~ N(0, alphastd)."""

    def __init__(self, alphastd: float = 0.1) -> None:
        super().__init__()
        self.alphastd = alphastd

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0 or img.shape[-3] != 3:
            return img
        alpha = torch.randn(3) * self.alphastd
        rgb = PCA_EIGVEC @ (alpha * PCA_EIGVAL)
        return img + rgb.view(3, 1, 1)


def train_transform(size: int, mean: Sequence[float], std: Sequence[float],
                    scale: tuple[int, int] = (256, 480), lighting: float = 0.1) -> v2.Compose:
    ratio = scale[0] / 224
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomShortestSize(list(range(round(size * ratio), round(size * scale[1] / 224) + 1))),
        v2.RandomCrop(size),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        Lighting(lighting),
        v2.Normalize(mean, std),
    ])


EVAL_CROP = 224 / 256  # the paper's test view (sec. 3.4): shorter side 256, centre 224


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([
        v2.PILToTensor(),
        v2.Resize(round(size / EVAL_CROP)),
        v2.CenterCrop(size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


@dataclass
class _TenCrops:
    """The ten crops of an image, stacked (v2's TenCrop gives a tuple, which v2 would
    transform crop by crop and collate as a tuple)."""

    resize: v2.Compose
    size: int
    scale: v2.Compose

    def __call__(self, im: Any) -> torch.Tensor:
        return self.scale(torch.stack(TF.ten_crop(self.resize(im), [self.size, self.size])))


def view_transform(views: str, size: int, mean: Sequence[float], std: Sequence[float]
                   ) -> Callable[[Any], torch.Tensor]:
    """An image as the test-time `views` take it from the whole image (paper sec. 3.4):
    `10crop`, the four corners and centre of the image resized to 256/224 of `size`, and
    their mirrors, stacked (10, C, size, size); `multiscale`, the whole image with its
    shorter side at `size` (evaluate.multiscale_probs scales it from there); else the
    centre crop."""
    if views == "10crop":
        return _TenCrops(v2.Compose([v2.PILToTensor(), v2.Resize(round(size / EVAL_CROP))]),
                         size, v2.Compose([v2.ToDtype(torch.float32, scale=True),
                                           v2.Normalize(mean, std)]))
    if views == "multiscale":
        return v2.Compose([v2.PILToTensor(), v2.Resize(size),
                           v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    return eval_transform(size, mean, std)


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time this process meets it: a bad file is named
    once, not once an epoch (one run logged the same 622 lines every epoch)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


@dataclass(frozen=True)
class Unreadable:
    """What a dataset yields for a file it could not read: the loader counts and names it
    in the main process (a worker's log would name it once per worker)."""

    message: str


def _hidden(path: str, prefix: str) -> bool:
    """Whether a part of `path` below `prefix` (ending in a separator) starts with a dot."""
    rel = path[len(prefix):]
    return rel.startswith(".") or os.sep + "." in rel


class ImageFolderDataset(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder with our decoder. An unreadable file yields `Unreadable`
    (skipped and counted by the loader), or, with `strict`, raises.

    `classes`: the class list and order to label with (a val/ folder takes train's, so a
    class it lacks changes no label); by default the sorted visible sub-folders. Hidden
    files and folders and the files in `exclude` are left out; `kept` maps the samples to
    torchvision's full list, whose length `all_count` is (random hold-outs index it)."""

    samples: list[tuple[str, int]]

    def __init__(self, root: Path, transform: v2.Compose, mode: str = "RGB",
                 strict: bool = False, classes: Sequence[str] | None = None,
                 exclude: Collection[str] = ()) -> None:
        if not root.is_dir():
            raise DataError(f"{root} is not a folder of class sub-folders")
        self._given = list(classes) if classes is not None else None
        try:
            super().__init__(str(root), transform=transform,
                             loader=lambda p: load_image(p, mode), allow_empty=True)
        except FileNotFoundError as e:
            raise DataError(f"{root}: {e}") from None
        full: list[tuple[str, int]] = self.samples
        self.all_count = len(full)
        prefix = os.path.join(os.path.expanduser(self.root), "")
        self.kept = [i for i, (p, _) in enumerate(full)
                     if p not in exclude and not _hidden(p, prefix)]
        self.samples = [full[i] for i in self.kept]
        self.imgs, self.targets = self.samples, [t for _, t in self.samples]
        if not self.samples:
            raise DataError(f"{root} holds no images in class sub-folders")
        self.strict = strict

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        classes = self._given if self._given is not None else sorted(
            e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if not classes:  # as torchvision words it; __init__ makes it a DataError
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {c: i for i, c in enumerate(classes)}

    def __getitem__(self, index: int):  # type: ignore[override]
        try:
            return super().__getitem__(index)
        except ImageError as e:
            if self.strict:
                raise
            return Unreadable(str(e))


class SeededSubset(Dataset):
    """`dataset[indices[i]]`; a key (i, seed) draws that example's random augmentation from
    `seed`, so it is the same in any worker, with any number of workers, after a resume."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]):  # type: ignore[override]
        if isinstance(key, int):
            return self.dataset[self.indices[key]]
        i, seed = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: torch.manual_seed also queues a CUDA seeding, with
            # a stack trace, when CUDA is not yet initialised (2 ms an image on a CPU).
            torch.default_generator.manual_seed(seed)
            return self.dataset[self.indices[i]]


def _collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """(images, labels, why each file of the batch that could not be read failed)."""
    bad = [b.message for b in batch if isinstance(b, Unreadable)]
    good = [b for b in batch if not isinstance(b, Unreadable)]
    if not good:
        return None, None, bad
    xs, ys = zip(*good, strict=True)
    return torch.stack(xs), torch.tensor(ys), bad


class _EpochSampler(Sampler[int | tuple[int, int]]):
    """The (seed, epoch) order, from global batch `start` on; with `world` > 1, this rank's
    slice of every global batch (training) or its contiguous shard (evaluation)."""

    def __init__(self, n: int, seed: int, shuffle: bool, batch: int, rank: int,
                 world: int) -> None:
        self.n, self.seed, self.shuffle, self.batch = n, seed, shuffle, batch
        self.rank, self.world = rank, world
        self.epoch, self.start = 0, 0

    def _indices(self) -> list[int]:
        if not self.shuffle:
            part = shard(self.n, self.rank, self.world)
            return list(range(part.start, part.stop))[self.start * self.batch:]
        order = epoch_permutation(self.n, self.seed, self.epoch).tolist()
        local = self.batch // self.world
        out = []
        for i in range(self.start, self.n // self.batch):
            first = i * self.batch + self.rank * local
            out += order[first:first + local]
        return out

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        if not self.shuffle:
            return iter(self._indices())
        # Training examples carry the seed of their augmentation (see SeededSubset).
        return iter((i, hash((self.seed, self.epoch, i)) % 2**62) for i in self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def too_many_unreadable(bad: int, seen: int, max_bad_fraction: float) -> bool:
    """Whether `bad` unreadable files of `seen` stop a run: more than the fraction, and more
    than one (in a folder of 60 a single file is past a 1% bar; many say the copy itself is
    broken). The folder check before training and the loader during it both ask this."""
    return bad > max(max_bad_fraction * seen, 1)


class FolderLoader:
    """DataLoader over an image folder with the same `batches(epoch, start)` interface.

    Unreadable files are skipped and counted; once more than `max_bad_fraction` of the
    files seen in a pass failed, the pass stops with a DataError (the log names each file).
    """

    def __init__(self, dataset: ImageFolderDataset | SeededSubset, batch_size: int,
                 shuffle: bool, drop_last: bool, workers: int, seed: int = 0,
                 channels_last: bool = False, rank: int = 0, world: int = 1,
                 max_bad_fraction: float = 0.01) -> None:
        if shuffle and batch_size % world:
            raise ValueError(f"batch size {batch_size} does not split over {world} processes")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.channels_last, self.max_bad_fraction = channels_last, max_bad_fraction
        self.sampler = _EpochSampler(len(dataset), seed, shuffle, batch_size, rank, world)
        local = batch_size // world if shuffle else batch_size
        # Persistent workers: starting them again each epoch cost more system than user
        # time on small folders (issue 16, item 9); the epoch reaches them in the indices.
        self.loader = DataLoader(dataset, batch_size=local, sampler=self.sampler,
                                 num_workers=workers, collate_fn=_collate,
                                 drop_last=drop_last, persistent_workers=workers > 0)

    def __len__(self) -> int:
        n = len(self.dataset) if self.sampler.shuffle else \
            len(shard(len(self.dataset), self.sampler.rank, self.sampler.world))
        b = self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def _check(self, bad: int, seen: int, final: bool) -> None:
        if (final or seen >= 100) and too_many_unreadable(bad, seen, self.max_bad_fraction):
            raise DataError(f"{bad} of {seen} images could not be read (more than "
                            f"{100 * self.max_bad_fraction:g}%); the log above names them. "
                            "Fix or remove them, or raise data.max_bad_fraction")

    skipped = 0  # files of the last pass that could not be read (an eval report says so)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start = epoch, start
        bad = seen = self.skipped = 0
        try:
            for x, y, failed in self.loader:
                for message in failed:
                    warn_once(f"skipping unreadable {message}")
                bad += len(failed)
                self.skipped = bad
                seen += len(failed) + (0 if y is None else len(y))
                self._check(bad, seen, final=False)
                if x is None or y is None:
                    continue
                if self.channels_last and x.dim() == 4:  # not a stack of views (N, V, ...)
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y
        except ImageError as e:  # --strict: a worker's error arrives wrapped in a traceback
            found = re.findall(r"ImageError: (.+)", str(e))
            raise ImageError(found[-1] if found else str(e).splitlines()[0]) from None
        self._check(bad, seen, final=True)
