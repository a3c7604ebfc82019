"""Data sets and loaders: `build_data` turns a DataConfig into train/val/test loaders."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD
from .config import DATASETS, DataConfig
from .folder import (
    FolderLoader,
    ImageFolderDataset,
    SeededSubset,
    eval_transform,
    train_transform,
)
from .memory import BatchAugment, InMemoryLoader, Normalize
from .sources import (
    CIFAR10_MD5,
    CIFAR100_MD5,
    FASHION_CLASSES,
    FASHION_MNIST_MD5,
    MNIST_CLASSES,
    MNIST_MD5,
    ArrayDataset,
    DataError,
    cache_dir,
    load_cifar_split,
    load_idx_split,
    locate_fashion_mnist,
)

SPLIT_SEED = 20151210  # the held-out split never depends on the run's seed


@dataclass
class DataBundle:
    train: Any
    val: Any | None
    test: Any
    classes: list[str]
    in_chans: int
    input_size: int
    mean: list
    std: list[float]
    # Evaluation uses the un-augmented training split for BN re-estimation (--recompute-bn).
    train_eval: Any


def load_arrays(dataset: str, data_dir: str | None, split: str, verify: bool) -> ArrayDataset:
    """One split (`train` or `test`) of a small-image data set, whole, in memory."""
    if dataset == "fashion-mnist":
        root = locate_fashion_mnist(data_dir)
        return load_idx_split(root, split, FASHION_CLASSES, FASHION_MNIST_MD5 if verify else None)
    if dataset == "mnist":
        root = Path(data_dir) if data_dir else cache_dir() / "mnist"
        return load_idx_split(root, split, MNIST_CLASSES, MNIST_MD5 if verify else None)
    if dataset in ("cifar10", "cifar100"):
        if not data_dir:
            raise ConfigError(f"{dataset} needs --data-dir (a folder holding the official "
                              "python batches); it cannot be downloaded here")
        n = 10 if dataset == "cifar10" else 100
        sums = (CIFAR10_MD5 if n == 10 else CIFAR100_MD5) if verify else None
        return load_cifar_split(Path(data_dir), n, split, sums)
    raise ConfigError(f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}")


def holdout(n: int, val_split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of (train, val): a fixed random `val_split` examples held out for choices."""
    if not 0 <= val_split < n:
        raise ConfigError(f"data.val_split must be in [0, {n}) for a training set of {n} "
                          f"examples, got {val_split}; set it with --set data.val_split=N")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return order[val_split:].sort().values, order[:val_split].sort().values


def _limit(data: ArrayDataset, n: int) -> ArrayDataset:
    return data.subset(torch.arange(min(n, len(data)))) if n > 0 else data


def build_data(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
               channels_last: bool = False, stats: tuple[list, list] | None = None,
               rank: int = 0, world: int = 1, strict: bool = False) -> DataBundle:
    """Loaders for a `DataConfig` (data/config.py).

    `stats` = (mean, std) of trained weights; by default they are fitted on the training
    split. `rank`/`world`: this process's share in data-parallel training. `strict`: an
    unreadable image file in a folder data set is an error instead of being skipped.
    """
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} must divide by the {world} processes")
    if cfg.dataset == "folder":
        return _build_folder(cfg, batch_size, eval_batch_size, seed, channels_last, stats,
                             rank, world, strict)
    full = _limit(load_arrays(cfg.dataset, cfg.data_dir, "train", cfg.verify), cfg.limit_train)
    test = _limit(load_arrays(cfg.dataset, cfg.data_dir, "test", cfg.verify), cfg.limit_test)
    tr_idx, va_idx = holdout(len(full), cfg.val_split)
    train = full.subset(tr_idx)
    norm = Normalize(*stats) if stats else Normalize.fit(train.images, cfg.normalize)
    aug = BatchAugment(cfg.pad, cfg.flip) if (cfg.pad or cfg.flip) else None

    def loader(data: ArrayDataset, training: bool) -> InMemoryLoader:
        return InMemoryLoader(data, batch_size if training else eval_batch_size, norm,
                              aug if training else None, shuffle=training, drop_last=training,
                              seed=seed, channels_last=channels_last, rank=rank, world=world)

    mean, std = norm.as_lists()
    return DataBundle(loader(train, True), loader(full.subset(va_idx), False) if len(va_idx)
                      else None, loader(test, False), train.classes, train.images.shape[1],
                      train.images.shape[-1], mean, std, loader(train, False))


def _build_folder(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                  channels_last: bool, stats: tuple[list, list] | None, rank: int,
                  world: int, strict: bool) -> DataBundle:
    if not cfg.data_dir:
        raise ConfigError("dataset=folder needs --data-dir with train/ and val/ sub-folders")
    root = Path(cfg.data_dir)
    mean, std = stats or (list(IMAGENET_MEAN), list(IMAGENET_STD))
    size = cfg.image_size
    train_ds = ImageFolderDataset(root / "train", train_transform(size, mean, std,
                                                                  lighting=cfg.lighting))
    plain_ds = ImageFolderDataset(root / "train", eval_transform(size, mean, std),
                                  strict=strict)
    test_ds = ImageFolderDataset(root / "val", eval_transform(size, mean, std), strict=strict)
    if test_ds.classes != train_ds.classes:
        raise DataError(f"{root}/val has classes {test_ds.classes}, train has {train_ds.classes}")
    tr_idx, va_idx = holdout(len(train_ds), cfg.val_split)

    def loader(ds: Any, training: bool) -> FolderLoader:
        return FolderLoader(ds, batch_size if training else eval_batch_size, training,
                            training, cfg.workers, seed, channels_last, rank, world,
                            cfg.max_bad_fraction)

    return DataBundle(loader(SeededSubset(train_ds, tr_idx.tolist()), True),
                      loader(SeededSubset(plain_ds, va_idx.tolist()), False) if len(va_idx)
                      else None, loader(test_ds, False), train_ds.classes, 3, size, mean, std,
                      loader(SeededSubset(plain_ds, tr_idx.tolist()), False))


__all__ = [
    "DATASETS",
    "ArrayDataset",
    "BatchAugment",
    "DataBundle",
    "DataConfig",
    "DataError",
    "InMemoryLoader",
    "Normalize",
    "build_data",
    "holdout",
    "load_arrays",
]
