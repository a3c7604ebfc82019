"""Data sets and loaders: `build_data` turns a DataConfig into train/val/test loaders."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD
from .config import DATASETS, DataConfig
from .folder import (
    EVAL_CROP,
    FolderLoader,
    ImageFolderDataset,
    SeededSubset,
    eval_transform,
    train_transform,
    view_transform,
    warn_once,
)
from .memory import BatchAugment, InMemoryLoader, Normalize, epoch_permutation
from .scan import FolderScan, folder_problems, looks_like_folder, name_some, scan_folder
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


@dataclass(frozen=True)
class TrainImages:
    """The image files a folder run trains on: their count and a digest of their paths.
    Another list draws other held-out images (stratified_holdout shuffles each class)."""

    files: int
    digest: str
    held_out: tuple[str, ...]  # the splits ("val", "test") drawn from these

    def record(self) -> dict[str, Any]:
        return {"train_files": self.files, "train_digest": self.digest}


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
    crop_pct: float | None = None  # the evaluation's centre crop (folders); None: whole image
    train_images: TrainImages | None = None  # folders only

    def weights_config(self) -> dict[str, Any]:
        """What the saved weights record of this data, so predict and serve see what the
        evaluation saw (save_weights' keyword arguments)."""
        crop = {} if self.crop_pct is None else {"crop_pct": self.crop_pct}
        return {"input_size": self.input_size, "mean": self.mean, "std": self.std, **crop}


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
               rank: int = 0, world: int = 1, strict: bool = False,
               min_size: int = 1, views: str = "center") -> DataBundle:
    """Loaders for a `DataConfig` (data/config.py).

    `stats` = (mean, std) of trained weights; by default they are fitted on the training
    split. `rank`/`world`: this process's share in data-parallel training. `strict`: an
    unreadable image file in a folder data set is an error instead of being skipped.
    `views`: the test-time views (evaluation.TTA_MODES) a folder's val and test images are
    prepared for (folder.view_transform); in-memory images are cropped by the views.
    `min_size`: the least image size the model can take (its total stride); a folder data
    set whose data.image_size is smaller is refused with its other problems.
    """
    if batch_size % world:
        raise ConfigError(f"batch_size {batch_size} must divide by the {world} processes")
    if cfg.dataset == "folder":
        return _build_folder(cfg, batch_size, eval_batch_size, seed, channels_last, stats,
                             rank, world, strict, min_size, views)
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
                      train.images.shape[-1], mean, std,
                      # Shuffled once, un-augmented: BN re-estimation and int8 calibration
                      # read its first batches (one process: evaluation's).
                      InMemoryLoader(train, eval_batch_size, norm, None, shuffle=world == 1,
                                     drop_last=False, seed=seed, channels_last=channels_last,
                                     rank=rank, world=world))


def _folder_checks(scan: FolderScan, cfg: DataConfig, min_size: int, strict: bool,
                   rank: int) -> None:
    """Every problem of the folder at once, as one DataError, before any loader is built;
    the warnings logged (by the first process only: every rank scans the same folder)."""
    errors, warns = folder_problems(scan, cfg.image_size, min_size, cfg.max_bad_fraction)
    if strict and scan.unreadable:
        errors.append(f"--strict stops at any unreadable file, and {len(scan.unreadable)} of "
                      f"{scan.checked} cannot be read ({name_some(scan.unreadable)}): fix or "
                      "remove them, or run without --strict")
    if cfg.stratified and cfg.val_split:
        try:
            _quotas(list(scan.train_counts.values()), cfg.val_split)
        except ConfigError as e:
            errors.append(str(e))
    if cfg.val_split == 0 and scan.val is None and scan.test is None:
        errors.append(f"{scan.root} has no val/ or test/ folder and data.val_split is 0, so "
                      "nothing is left to test on: add a val/ folder of class sub-folders (or more "
                      "images: a class of one image cannot spare one), or set data.val_split=N")
    if rank == 0:
        for message in warns:
            warn_once(message)
    if errors:
        n = len(errors)
        raise DataError(f"{scan.root} has {n} problem{'' if n == 1 else 's'}:" +
                        "".join(f"\n- {e}" for e in errors))


def stratified_holdout(labels: Sequence[int], val_split: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of (train, val): `val_split` examples held out in the classes' proportions,
    at least one of every class with two or more, never a class's last; fixed."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    ys = sorted(by_class)
    quota = _quotas([len(by_class[y]) for y in ys], val_split)
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    val: list[int] = []
    for y, q in zip(ys, quota, strict=True):
        members = by_class[y]
        val += [members[j] for j in torch.randperm(len(members), generator=gen)[:q].tolist()]
    held = set(val)
    train = [i for i in range(len(labels)) if i not in held]
    return torch.tensor(train, dtype=torch.long), torch.tensor(sorted(val), dtype=torch.long)


def _quotas(sizes: list[int], k: int) -> list[int]:
    """How many of each class to hold out: largest remainders of k in proportion to
    `sizes`, at least 1 and at most size - 1 per class (none of a one-image class)."""
    room = [n - 1 for n in sizes]
    classes = sum(r > 0 for r in room)
    if k < classes:
        raise ConfigError(f"data.val_split={k} is fewer than the {classes} classes a "
                          "stratified hold-out takes one image of; set data.val_split >= "
                          f"{classes}")
    if k > sum(room):
        raise ConfigError(f"data.val_split={k} would leave a class without training images; "
                          f"set data.val_split <= {sum(room)}")
    exact = [k * n / sum(sizes) for n in sizes]
    quota = [min(r, max(1, math.floor(e))) if r else 0 for e, r in zip(exact, room, strict=True)]
    # Feasible by the checks above, so each pass moves at least one image and this ends.
    while sum(quota) != k:
        grow = sum(quota) < k
        if grow:
            order = sorted((i for i, r in enumerate(room) if quota[i] < r),
                           key=lambda i: quota[i] - exact[i])
        else:
            order = sorted((i for i, q in enumerate(quota) if q > 1),
                           key=lambda i: exact[i] - quota[i])
        for i in order[:abs(k - sum(quota))]:
            quota[i] += 1 if grow else -1
    return quota


def _folder_split(ds: ImageFolderDataset, cfg: DataConfig) -> tuple[list[int], list[int]]:
    """Indices into `ds` of (train, held-out val)."""
    if cfg.stratified and cfg.val_split:
        tr, va = stratified_holdout(ds.targets, cfg.val_split)
        return tr.tolist(), va.tolist()
    # Drawn over torchvision's full list, as before files were left out: a run made before
    # keeps its split; the left-out files then drop from whichever side they fell on.
    tr, va = holdout(ds.all_count, cfg.val_split)
    where = {orig: i for i, orig in enumerate(ds.kept)}
    return ([where[i] for i in tr.tolist() if i in where],
            [where[i] for i in va.tolist() if i in where])


def _build_folder(cfg: DataConfig, batch_size: int, eval_batch_size: int, seed: int,
                  channels_last: bool, stats: tuple[list, list] | None, rank: int,
                  world: int, strict: bool, min_size: int, views: str) -> DataBundle:
    if not cfg.data_dir:
        raise ConfigError("dataset=folder needs --data-dir with train/ and val/ sub-folders")
    scan = scan_folder(cfg.data_dir)
    _folder_checks(scan, cfg, min_size, strict, rank)
    mean, std = stats or (list(IMAGENET_MEAN), list(IMAGENET_STD))
    size = cfg.image_size
    plain = eval_transform(size, mean, std)

    def dataset(split: Path, transform: Any, strict_: bool) -> ImageFolderDataset:
        # Every split is labelled by train's classes; the scan's unreadable files stay out.
        return ImageFolderDataset(split, transform, strict=strict_, classes=scan.classes,
                                  exclude=scan.unreadable_paths)

    def scored(ds: Any) -> FolderLoader:
        # Ten views an image take ten times the memory; multi-scale images differ in shape.
        batch = {"10crop": max(1, eval_batch_size // 10), "multiscale": 1}.get(
            views, eval_batch_size)
        return FolderLoader(ds, batch, False, False, cfg.workers, seed, channels_last, rank,
                            world, cfg.max_bad_fraction)

    train_ds = dataset(scan.train, train_transform(size, mean, std, lighting=cfg.lighting),
                       False)
    plain_ds = dataset(scan.train, plain, strict)
    whole = views in ("10crop", "multiscale")  # from the whole image, not the centre crop
    shown = view_transform(views, size, mean, std) if whole else plain
    tr_idx, va_idx = _folder_split(train_ds, cfg)
    held_ds = dataset(scan.train, shown, strict) if whole else plain_ds
    held = scored(SeededSubset(held_ds, va_idx)) if va_idx else None
    val_dir = scored(dataset(scan.val, shown, strict)) if scan.val else None
    test_dir = scored(dataset(scan.test, shown, strict)) if scan.test else None
    # One loader object where val and test are the same data: the trainer scores it once.
    val = held if held is not None else val_dir
    test = next((t for t in (test_dir, val_dir, held) if t is not None), None)
    train = FolderLoader(SeededSubset(train_ds, tr_idx), batch_size, True, True, cfg.workers,
                         seed, channels_last, rank, world, cfg.max_bad_fraction)
    return DataBundle(train, val, test, scan.classes,
                      3, size, mean, std,
                      # As above: in folder order its first batches would be a class or two.
                      # A fixed permutation, walked in order: every image, the last batch too.
                      FolderLoader(SeededSubset(plain_ds, [tr_idx[i] for i in epoch_permutation(
                                       len(tr_idx), seed, 0).tolist()]),
                                   eval_batch_size, False, False, cfg.workers, seed,
                                   channels_last, rank, world, cfg.max_bad_fraction),
                      EVAL_CROP, TrainImages(scan.train_files, scan.train_digest,
                                             tuple(name for name, split in (("val", val),
                                                                            ("test", test))
                                                   if held is not None and split is held)))


__all__ = [
    "DATASETS",
    "ArrayDataset",
    "BatchAugment",
    "DataBundle",
    "DataConfig",
    "DataError",
    "FolderScan",
    "InMemoryLoader",
    "Normalize",
    "TrainImages",
    "build_data",
    "folder_problems",
    "holdout",
    "load_arrays",
    "looks_like_folder",
    "scan_folder",
    "stratified_holdout",
]
