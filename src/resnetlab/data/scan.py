"""Look at a folder of the user's images before training on it: its layout, classes, image
counts and sizes, and every problem that would stop or spoil a run.

Only file headers are read (PIL's `Image.open` parses the header and decodes no pixels),
so a recipe can be sized from the data and all problems listed at once, in seconds, before
anything is written. Layouts: `root/train/<class>/` with optional `root/val/<class>/` and
`root/test/<class>/` (split folders named as downloads name them: Train/, valid/,
validation/, testing/...), or the Keras layout `root/<class>/` (root itself trains).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import statistics
import warnings
from collections import Counter
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
# Split folders by role, matched without regard to case: Kaggle and Roboflow downloads name
# them Train/, valid/, validation/... A name not matched would become a class.
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation"),
               "test": ("test", "testing")}
# Image files of kinds the loader does not read (by extension): counted, so a folder of
# them is said to be one instead of "holds no images".
OTHER_IMAGES = (".heic", ".heif", ".avif", ".gif", ".jfif", ".jxl", ".jp2", ".svg", ".dng",
                ".cr2", ".nef", ".arw")


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
    other_images: dict[str, int] = field(default_factory=dict)  # OTHER_IMAGES found, by kind
    unlabelled: tuple[Path, ...] = ()  # split folders without class folders: not used
    train_files: int = 0  # image files listed in `train`, readable or not
    train_digest: str = ""  # of their paths below `train`: another file list, another digest

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
    other_images: Counter[str]
    files: int  # image files listed, readable or not
    digest: str  # of their paths below the split folder: changes when any file comes or goes


def _visible(name: str) -> bool:
    # Hidden entries are tool litter (.ipynb_checkpoints/, macOS ._x.jpg), never data.
    return not name.startswith(".")


def _is_dir(e: os.DirEntry[str]) -> bool:
    try:
        return e.is_dir()
    except OSError as err:  # a link to itself: ELOOP
        raise DataError(f"{e.path}: {err.strerror}; remove that link") from None


def _class_dirs(split: Path) -> list[str]:
    try:
        with os.scandir(split) as it:
            entries = list(it)
    except OSError:
        return []
    return sorted(e.name for e in entries if _visible(e.name) and _is_dir(e))


def _iter_images(folder: str, others: Counter[str] | None = None) -> Iterator[str]:
    """Image files under `folder`, at any depth, following links as ImageFolder does; the
    OTHER_IMAGES met are counted into `others`. A folder reached twice (a link back up the
    tree, which ImageFolder would follow forever) is refused."""
    stack, seen = [folder], set()
    while stack:
        d = stack.pop()
        try:
            st = os.stat(d)
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            raise DataError(f"{d} is a folder met before (a symbolic link to a folder above "
                            "it, or a second link to one folder): its images would be read "
                            "forever or twice; remove that link")
        seen.add((st.st_dev, st.st_ino))
        for e in entries:
            if not _visible(e.name):
                continue
            if _is_dir(e):
                stack.append(e.path)
            elif e.name.lower().endswith(IMG_EXTENSIONS):
                yield e.path
            elif others is not None and e.name.lower().endswith(OTHER_IMAGES):
                others[os.path.splitext(e.name)[1].lower()] += 1


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
    others: Counter[str] = Counter()
    files = [(c, p) for c in classes for p in sorted(_iter_images(str(split / c), others))]
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
    listed = "\n".join(os.path.relpath(p, split) for _, p in files)
    return _Split(counts, sizes, bad, len(opened), complete, others, len(files),
                  hashlib.sha256(listed.encode("utf-8", "surrogateescape")).hexdigest())


def _splits(root: Path) -> dict[str, Path]:
    """root's split folders by role (SPLIT_NAMES)."""
    dirs = _class_dirs(root)
    found = {}
    for role, names in SPLIT_NAMES.items():
        match = [d for d in dirs if d.lower() in names]
        if len(match) > 1:
            raise DataError(f"{root} has {len(match)} {role} folders ({', '.join(match)}): "
                            "keep one, or merge them")
        if match:
            found[role] = root / match[0]
    return found


def _layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """(train, val, test) folders: root/train/ and its siblings that hold class folders
    (an unlabelled test/, as Kaggle's, is not a split: _unlabelled), or root itself."""
    splits = _splits(root)
    if "train" not in splits:
        return root, None, None
    val, test = (splits.get(k) for k in ("val", "test"))
    return (splits["train"], val if val and _class_dirs(val) else None,
            test if test and _class_dirs(test) else None)


def _unlabelled(root: Path) -> list[Path]:
    """Split folders beside train/ without class folders: not used, said so."""
    splits = _splits(root)
    if "train" not in splits:
        return []
    return [d for k, d in splits.items() if k != "train" and not _class_dirs(d)]


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
        unreadable_paths=frozenset(p for p, _ in bad),
        other_images=dict(sum((s.other_images for s in parts.values()), Counter())),
        unlabelled=tuple(_unlabelled(root)),
        train_files=parts[train].files, train_digest=parts[train].digest)


def _kinds(counts: dict[str, int]) -> str:
    """"12 .heic files, 3 .gif files"""
    return ", ".join(f"{n} {ext} file{'' if n == 1 else 's'}"
                     for ext, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def not_a_folder(path: str | os.PathLike[str]) -> str:
    """Why `path` is not a folder of images to train on, as a sentence saying what to do
    (for a path looks_like_folder turned down)."""
    root = Path(path)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        return f"{root} {what}: give the folder that holds your images, laid out as {LAYOUT}"
    train = _layout(root)[0]
    classes = _class_dirs(train)
    if not classes:
        loose = sum(1 for _ in _iter_images_here(train))
        lying = f" ({loose} images lie in it directly)" if loose else ""
        return (f"{train} has no class folders{lying}: put each class's images in a folder "
                f"named after the class, as {LAYOUT}")
    others: Counter[str] = Counter()
    for c in classes:
        for _ in _iter_images(str(train / c), others):
            break
    kinds = f" ({_kinds(others)}: convert them to JPEG or PNG)" if others else ""
    return (f"the class folders of {train} ({name_some(classes)}) hold no images of the "
            f"kinds read ({', '.join(IMG_EXTENSIONS)}){kinds}")


def _iter_images_here(folder: Path) -> Iterator[str]:
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except OSError:
        return
    yield from (e.path for e in entries if _visible(e.name) and e.is_file()
                and e.name.lower().endswith(IMG_EXTENSIONS))


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
    if scan.train == scan.root:  # DIR/<class>/: a split folder here would be a class
        errors += [f"{scan.root / c} is named as a split folder, not a class: lay the folder "
                   f"out as {LAYOUT}" for c in scan.classes
                   if any(c.lower() in names for names in SPLIT_NAMES.values())]
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
    warns += [f"{d} has no class folders, so it is not used: to validate or test on its "
              f"images, put them in {d}/<class>/, as in {scan.train}" for d in scan.unlabelled]
    if scan.other_images:
        warns.append(f"{_kinds(scan.other_images)} in the class folders are images of a kind "
                     "not read, and are left out: convert them to JPEG or PNG to use them")
    if image_size < min_size:
        errors.append(f"data.image_size={image_size} is smaller than the model's total stride "
                      f"{min_size}: its last feature map would be empty; set data.image_size "
                      f">= {min_size} or choose a CIFAR-style model (resnet20)")
    return errors, warns
