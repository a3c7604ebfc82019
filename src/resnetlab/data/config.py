"""The data section of a training config: which data set, its split and augmentation."""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder")
# How a folder data set is laid out, as every message that asks for one says it.
LAYOUT = "DIR/train/<class>/ (optionally with DIR/val/<class>/) or DIR/<class>/"


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"  # fashion-mnist, mnist, cifar10, cifar100 or folder
    data_dir: str | None = None  # the data set's files; None: its usual places (docs/training.md)
    val_split: int = 5000  # examples held out of the training set for choices
    stratified: bool = False  # folder data sets: the held-out examples in class proportions
    normalize: str = "channel"  # "channel" mean/std, or "pixel": the paper's per-pixel mean
    pad: int = 4  # random crop of the image zero-padded by this much (0: no crop)
    flip: bool = True  # random horizontal flips in training
    verify: bool = True  # MD5-check the official files
    limit_train: int = 0  # use only the first N training examples (0: all); for smoke runs
    limit_test: int = 0  # score only the first N test examples (0: all); for smoke runs
    image_size: int = 224  # folder data sets: the side of the crop the net sees
    workers: int = 2  # folder data sets: DataLoader workers
    lighting: float = 0.1  # folder data sets: AlexNet PCA colour augmentation std
    # folder data sets: stop if more unreadable files than this (one alone never stops a run)
    max_bad_fraction: float = 0.01
