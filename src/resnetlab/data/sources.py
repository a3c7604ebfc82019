"""Small-image data sets read from their official files into one uint8 tensor each.

Formats: IDX (MNIST, Fashion-MNIST; gzipped or not) and the CIFAR-10/100 "python version"
pickle batches. The CIFAR pickles are read by an unpickler that only rebuilds numpy arrays,
lists and dicts, so a hostile batch file cannot run code. Files are checked against the
official MD5 sums; tests and private copies pass their own table (or `verify=False`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ResNetLabError
from ..files import cache_dir
from .config import LAYOUT

log = logging.getLogger(__name__)


class DataError(ResNetLabError):
    """Missing, corrupted or unrecognised data files."""


@dataclass
class ArrayDataset:
    """A whole split in memory: images (N, C, H, W) uint8, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 NCHW, got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index], self.classes)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]

IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
# MD5 of the decompressed IDX files: independent of how a copy was gzipped (Debian's
# dataset-fashion-mnist recompresses the official .gz files, so their own sums differ).
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# MD5 of the official .gz downloads (as published with the data sets).
FASHION_MNIST_GZ_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR10_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
FASHION_MNIST_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def md5sum(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _verify(name: str, data: bytes, table: Mapping[str, str] | None, path: Path) -> None:
    if table is None or name not in table:
        return
    if md5sum(data) != table[name]:
        raise DataError(f"{path} fails its MD5 check (expected {table[name]}): the file is "
                        "corrupted or not the official one; delete it and fetch it again")


# ---------------------------------------------------------------------------------- IDX

def read_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse an IDX file (magic: 0, 0, type 0x08 = uint8, number of dimensions)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 0
    if len(data) != header + count:
        raise DataError(f"{path} is truncated: IDX header says {shape}, "
                        f"{len(data) - header} bytes of data follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def holds_idx(root: str | Path) -> bool:
    """Whether `root` holds any of the IDX files (MNIST's layout, Fashion-MNIST's too)."""
    return any(_find_idx(Path(root), s) for pair in IDX_FILES.values() for s in pair)


def load_idx_split(root: Path, split: str, classes: list[str],
                   checksums: Mapping[str, str] | None) -> ArrayDataset:
    """Read the images and labels of one split (`train` or `test`) of an IDX data set."""
    arrays = []
    for stem in IDX_FILES[split]:
        path = _find_idx(root, stem)
        if path is None:
            raise DataError(f"{root} has no {stem}[.gz]")
        raw = path.read_bytes()
        try:
            data = gzip.decompress(raw) if path.suffix == ".gz" else raw
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is not a valid gzip file: {e}") from None
        _verify(stem, data, checksums, path)
        arrays.append(read_idx(data, path))
    images, labels = arrays
    if images.ndim != 3:
        raise DataError(f"{root}: IDX images must be N x H x W, got {images.shape}")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                        torch.from_numpy(labels.astype(np.int64)), classes)


def download_fashion_mnist(dest: Path, base_url: str = FASHION_MNIST_URL,
                           checksums: Mapping[str, str] = FASHION_MNIST_GZ_MD5,
                           timeout: float = 30.0) -> Path:
    """Fetch the four official .gz files into `dest`, checking each MD5 before keeping it."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, md5 in checksums.items():
        target = dest / name
        if target.is_file() and md5sum(target.read_bytes()) == md5:
            continue
        log.info("downloading %s", base_url + name)
        with urllib.request.urlopen(base_url + name, timeout=timeout) as r:
            data = r.read()
        if md5sum(data) != md5:
            raise DataError(f"{base_url + name} fails its MD5 check; not saved")
        # A name of this process's own: ranks of one job may download at once.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return dest


def locate_fashion_mnist(data_dir: str | Path | None, download: bool = True) -> Path:
    """The first folder holding the files: --data-dir, Debian's package, the user cache,
    then a download into the cache. Otherwise one message saying how to get them."""
    def complete(root: Path) -> bool:
        return all(_find_idx(root, s) for pair in IDX_FILES.values() for s in pair)

    if data_dir:  # an explicit folder is the only place looked at
        if complete(Path(data_dir)):
            return Path(data_dir)
        raise DataError(f"{data_dir} does not hold the Fashion-MNIST IDX files "
                        f"({', '.join(FASHION_MNIST_GZ_MD5)}); for your own images, lay "
                        f"them out as {LAYOUT} and run `resnetlab train DIR`")
    for root in (FASHION_MNIST_DEBIAN_DIR, cache_dir() / "fashion-mnist"):
        if complete(root):
            return root
    if download:
        try:
            return download_fashion_mnist(cache_dir() / "fashion-mnist")
        except OSError as e:
            log.info("download failed: %s", e)
    raise DataError("Fashion-MNIST not found. Install it with `sudo apt-get install "
                    "dataset-fashion-mnist`, or put the four .gz files from "
                    f"{FASHION_MNIST_URL} in {cache_dir() / 'fashion-mnist'} "
                    "(or pass --data-dir)")


# -------------------------------------------------------------------------------- CIFAR

class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds only what CIFAR batches contain: numpy arrays, dicts, lists, str, bytes."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(path: Path, checksums: Mapping[str, str] | None) -> dict:
    data = path.read_bytes()
    _verify(path.name, data, checksums, path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # any malformed pickle: report the file, never run it
        raise DataError(f"{path} is not a CIFAR python batch: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (no dict inside)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def load_cifar_split(root: Path, num_classes: int, split: str,
                     checksums: Mapping[str, str] | None) -> ArrayDataset:
    """CIFAR-10 (`cifar-10-batches-py/`) or CIFAR-100 (`cifar-100-python/`) from `root`."""
    if num_classes not in (10, 100):
        raise ConfigError("CIFAR has 10 or 100 classes")
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    if not folder.is_dir():
        folder = root  # the batches may sit directly in root
    if num_classes == 10:
        names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name, label_key, names_key = "batches.meta", "labels", "label_names"
    else:
        names, meta_name = [split], "meta"
        label_key, names_key = "fine_labels", "fine_label_names"
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing; CIFAR cannot be downloaded here: unpack the "
                            f"official python archive into {root}")
        batch = read_cifar_batch(path, checksums)
        try:
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (KeyError, ValueError) as e:
            raise DataError(f"{path} lacks CIFAR fields: {e}") from None
    classes = CIFAR10_CLASSES if num_classes == 10 else [str(i) for i in range(100)]
    meta = folder / meta_name
    if meta.is_file():
        classes = [c.decode() if isinstance(c, bytes) else str(c)
                   for c in read_cifar_batch(meta, checksums)[names_key]]
    return ArrayDataset(torch.from_numpy(np.concatenate(images)),
                        torch.from_numpy(np.concatenate(labels)), classes)

