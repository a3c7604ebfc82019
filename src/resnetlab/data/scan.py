"""Look at a folder of the user's images before training on it: its layout, classes, image
counts and sizes, and every problem that would stop or spoil a run.

Only file headers are read (PIL's `Image.open` parses the header and decodes no pixels),
so a recipe can be sized from the data and all problems listed at once, in seconds, before
anything is written. Layouts: `root/train/<class>/` with optional `root/val/<class>/` and
`root/test/<class>/`, or the Keras layout `root/<class>/` (root itself trains).
"""

from __future__ import annotations

import logging
import math
import os
import random
import statistics
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from .config import LAYOUT
from .folder import too_many_unreadable
from .images import MAX_PIXELS
from .sources import DataError

log = logging.getLogger(__name__)

SAMPLE_ABOVE = 20_000  # files in a split; above this only a sample's headers are opened
SAMPLE_SIZE = 2_000
SAMPLE_SEED = 20151210  # the sample, hence the scan, is the same on every call
NAMED = 5  # unreadable files named in a message; the rest are counted


@dataclass(frozen=True)
class FolderScan:
    root: Path
    train: Path  # folder of class sub-folders that trains
    val: Path | None  # root/val if it holds class sub-folders
    test: Path | None  # root/test if it holds class sub-folders
    classes: list[str]  # sorted class folder names of `train` (torchvision ImageFolder order)
    train_counts: dict[str, int]  # readable images per class (every class of train, 0 too)
    val_counts: dict[str, int]  # readable images per class folder of val/ ({} without val/)
    test_counts: dict[str, int]
    image_size: int  # median shorter side (px) of the training images whose header was read
    unreadable: list[str]  # "path: reason" of files whose header could not be read
    checked_all: bool  # False when only a sample was opened (very large folders)
    checked: int = 0  # files whose header was opened: the denominator of the bad fraction
    # The paths of `unreadable`, for the datasets to leave out (a path may hold ": ").
    unreadable_paths: frozenset[str] = field(default_factory=frozenset)

    @property
    def n_train(self) -> int:
        return sum(self.train_counts.values())

    def split_counts(self, split: Path) -> dict[str, int]:
        """The per-class counts of `split` (one of train, val, test)."""
        if split == self.train:
            return self.train_counts
        return self.val_counts if split == self.val else self.test_counts


@dataclass
class _Split:
    counts: dict[str, int]
    sizes: list[int]  # shorter sides of the readable images opened
    bad: list[tuple[str, str]]  # (path, reason)
    checked: int
    complete: bool


def _visible(name: str) -> bool:
    # Hidden entries are tool litter (.ipynb_checkpoints/, macOS ._x.jpg), never data.
    return not name.startswith(".")


def _class_dirs(split: Path) -> list[str]:
    try:
        with os.scandir(split) as it:
            return sorted(e.name for e in it if _visible(e.name) and e.is_dir())
    except OSError:
        return []


def _iter_images(folder: str) -> Iterator[str]:
    """Image files under `folder`, at any depth, following links as ImageFolder does."""
    stack = [folder]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                entries = list(it)
        except OSError:
            continue
        for e in entries:
            if not _visible(e.name):
                continue
            if e.is_dir():
                stack.append(e.path)
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                yield e.path


def _header(path: str) -> tuple[int, int] | str:
    """(width, height) from the file's header, or why it cannot be read (as images.py
    words it, so the scan and the loader name a file's fault alike)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        return "no such file"
    except UnidentifiedImageError:
        return "not a recognised image format"
    except Image.DecompressionBombError:
        return f"more than {MAX_PIXELS:,} pixels; refusing a possible decompression bomb"
    except (OSError, ValueError, SyntaxError) as e:
        return f"unreadable or truncated image ({e})"
    if w * h > MAX_PIXELS:
        return (f"{w}x{h} = {w * h:,} pixels is more than {MAX_PIXELS:,}; refusing a "
                "possible decompression bomb")
    if w < 1 or h < 1:
        return f"empty image ({w}x{h})"
    return w, h


def _scan_split(split: Path) -> _Split:
    classes = _class_dirs(split)
    files = [(c, p) for c in classes for p in sorted(_iter_images(str(split / c)))]
    counts = dict.fromkeys(classes, 0)
    for c, _ in files:
        counts[c] += 1
    complete = len(files) <= SAMPLE_ABOVE
    opened = files if complete else random.Random(SAMPLE_SEED).sample(files, SAMPLE_SIZE)
    if not complete:
        log.info("%s: %d image files; reading the headers of a sample of %d", split,
                 len(files), SAMPLE_SIZE)
    sizes, bad = [], []
    with warnings.catch_warnings():
        # PIL warns of large images; our own MAX_PIXELS limit decides (as load_image does).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for c, path in opened:
            found = _header(path)
            if isinstance(found, str):
                bad.append((path, found))
                counts[c] -= 1
            else:
                sizes.append(min(found))
    return _Split(counts, sizes, bad, len(opened), complete)


def _split_dir(root: Path, name: str) -> Path | None:
    d = root / name
    return d if d.is_dir() and _class_dirs(d) else None


def _layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """(train, val, test) folders: root/train/ and its siblings, or root itself."""
    if (root / "train").is_dir():
        return root / "train", _split_dir(root, "val"), _split_dir(root, "test")
    return root, None, None


def looks_like_folder(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is laid out as DIR/train/<class>/ or DIR/<class>/ with image files
    in at least one class folder. Stops at the first image found: cheap on any size."""
    root = Path(path)
    if not root.is_dir():
        return False
    train = _layout(root)[0]
    return any(next(_iter_images(str(train / c)), None) for c in _class_dirs(train))


def _stamp(root: Path) -> tuple[int, ...]:
    """Modification times of the folders whose entries make up the scan (a file added to
    or removed from a class folder changes that folder's time)."""
    dirs = [root, *(d for d in _layout(root) if d is not None)]
    dirs += [d / c for d in dirs[1:] for c in _class_dirs(d)]
    out = []
    for d in dirs:
        try:
            out.append(d.stat().st_mtime_ns)
        except OSError:
            out.append(-1)
    return tuple(out)


_CACHE: dict[tuple[str, str, tuple[int, ...]], FolderScan] = {}
_CACHE_SIZE = 8


def scan_folder(root: str | os.PathLike[str]) -> FolderScan:
    """The layout, classes, readable image counts and typical size of an image folder.
    Cached within the process until a folder of it changes (sizing the recipe and building
    the loaders read the same folder)."""
    path = Path(root)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise DataError(f"{path} {what}: give the folder that holds your images, laid out "
                        f"as {LAYOUT}")
    key = (os.fspath(path), str(path.resolve()), _stamp(path))
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        _CACHE[key] = _scan(path)
    return _CACHE[key]


def _scan(root: Path) -> FolderScan:
    train, val, test = _layout(root)
    parts = {d: _scan_split(d) for d in (train, val, test) if d is not None}
    bad = [b for s in parts.values() for b in s.bad]
    sizes = parts[train].sizes
    return FolderScan(
        root=root, train=train, val=val, test=test, classes=list(parts[train].counts),
        train_counts=parts[train].counts,
        val_counts=parts[val].counts if val else {},
        test_counts=parts[test].counts if test else {},
        # A median: one odd panorama or thumbnail does not size the recipe.
        image_size=math.floor(statistics.median(sizes) + 0.5) if sizes else 0,
        unreadable=[f"{p}: {why}" for p, why in bad],
        checked_all=all(s.complete for s in parts.values()),
        checked=sum(s.checked for s in parts.values()),
        unreadable_paths=frozenset(p for p, _ in bad))


def name_some(items: list[str]) -> str:
    """The first NAMED items, then how many more."""
    shown = ", ".join(items[:NAMED])
    return shown + (f" and {len(items) - NAMED} more" if len(items) > NAMED else "")


def _class_problems(scan: FolderScan) -> list[str]:
    n = len(scan.classes)
    errors = []
    if n < 2:
        errors.append(f"{scan.train} has {n} class folder{'' if n == 1 else 's'}; a "
                      f"classifier needs at least 2: lay images out as {LAYOUT}")
    errors += [f"class {c} in {scan.train} holds no images: add some or remove the folder"
               for c, k in scan.train_counts.items() if k == 0]
    return errors


def _split_problems(scan: FolderScan, split: Path | None) -> tuple[list[str], list[str]]:
    if split is None:
        return [], []
    counts = scan.split_counts(split)
    errors: list[str] = []
    warns: list[str] = []
    # An empty folder that train/ lacks labels nothing, so only one holding images counts.
    extra = sorted(c for c, k in counts.items() if k and c not in scan.classes)
    if extra:
        errors.append(f"{split} has classes {extra} that {scan.train.name}/ lacks: rename or "
                      "remove them")
    if not any(counts.values()):
        errors.append(f"{split} holds no images: add some to its class folders or remove it")
        return errors, warns
    missing = [c for c in scan.classes if not counts.get(c)]
    if missing:
        warns.append(f"{split.name}/ has no images of {missing}; their accuracy is not "
                     f"measured: add some to {split}/<class>/ to measure it")
    return errors, warns


def _unreadable_problem(scan: FolderScan, max_bad_fraction: float) -> tuple[list[str], list[str]]:
    k = len(scan.unreadable)
    if not k:
        return [], []
    # A scan built by hand may not say how many it opened: then every file counted was.
    checked = scan.checked or k + sum(n for c in (scan.train_counts, scan.val_counts,
                                                  scan.test_counts) for n in c.values())
    of = f"{k} of {checked} image files{'' if scan.checked_all else ' sampled'}"
    if not too_many_unreadable(k, checked, max_bad_fraction):
        return [], [f"{of} cannot be read and are left out ({name_some(scan.unreadable)}): fix "
                    "or remove them"]
    return [f"{of} cannot be read, more than data.max_bad_fraction="
            f"{max_bad_fraction:g} ({name_some(scan.unreadable)}): fix or remove them, or raise "
            "data.max_bad_fraction"], []


def folder_problems(scan: FolderScan, image_size: int, min_size: int,
                    max_bad_fraction: float) -> tuple[list[str], list[str]]:
    """(errors, warnings) of training on `scan` at `image_size` with a net that needs at
    least `min_size` px; each a sentence that says what to do. Errors stop a run."""
    errors = _class_problems(scan)
    warns: list[str] = []
    for split in (scan.val, scan.test):
        e, w = _split_problems(scan, split)
        errors += e
        warns += w
    e, w = _unreadable_problem(scan, max_bad_fraction)
    errors += e
    warns += w
    if image_size < min_size:
        errors.append(f"data.image_size={image_size} is smaller than the model's total stride "
                      f"{min_size}: its last feature map would be empty; set data.image_size "
                      f">= {min_size} or choose a CIFAR-style model (resnet20)")
    return errors, warns
