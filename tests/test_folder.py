"""Issue 31: the user's own image folder, scanned before training (data/scan.py) and read
into train/val/test loaders by `build_data` (data/__init__.py, data/folder.py)."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.data import (
    DataConfig,
    DataError,
    FolderScan,
    build_data,
    folder_problems,
    holdout,
    looks_like_folder,
    scan_folder,
    stratified_holdout,
)
from resnetlab.data import scan as scan_module
from resnetlab.errors import ConfigError

# (width, height): shorter sides 37, 40, 36, 39, 20 -> median 37
SIZES = [(37, 45), (40, 40), (44, 36), (41, 39), (90, 20)]


def _images(folder: Path, n: int, colour: int = 100, gray: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = SIZES[i % len(SIZES)]
        im = Image.new("L", size, colour) if gray else Image.new("RGB", size, (colour, 0, 0))
        path = folder / f"{i}.png"
        im.save(path)
        paths.append(path)
    return paths


def _folder(root: Path, train: dict[str, int], val: dict[str, int] | None = None,
            test: dict[str, int] | None = None) -> Path:
    for split, classes in (("train", train), ("val", val), ("test", test)):
        for k, (name, n) in enumerate((classes or {}).items()):
            _images(root / split / name, n, colour=40 * k + 20, gray=k == 1)
    return root


def _cfg(root: Path, **kw: object) -> DataConfig:
    base: dict[str, object] = {"dataset": "folder", "data_dir": str(root), "val_split": 0,
                               "image_size": 16, "workers": 0}
    return DataConfig(**{**base, **kw})  # type: ignore[arg-type]


def _labels(loader: object) -> list[int]:
    return [y for _, ys in loader.batches(0) for y in ys.tolist()]  # type: ignore[attr-defined]


def _warned(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------ the scan

def test_scan_reads_classes_counts_and_the_median_shorter_side(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"b": 5, "a": 4, "c": 3}, val={"a": 2, "c": 1})
    _images(root / "train" / "a" / "nested", 1)  # ImageFolder reads sub-folders too
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / "._0.png").write_bytes(b"macOS litter")  # hidden: ignored
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden: not a class
    scan = scan_folder(root)
    assert (scan.train, scan.val, scan.test) == (root / "train", root / "val", None)
    assert scan.classes == ["a", "b", "c"]
    assert scan.train_counts == {"a": 5, "b": 5, "c": 3} and scan.n_train == 13
    assert scan.val_counts == {"a": 2, "c": 1} and scan.test_counts == {}
    # shorter sides: a 37,40,36,39 +37; b 37,40,36,39,20; c 37,40,36 -> median 37
    assert scan.image_size == 37
    assert scan.unreadable == [] and scan.checked_all and scan.checked == 16


def test_scan_of_the_keras_layout_and_what_looks_like_a_folder(tmp_path: Path) -> None:
    keras = tmp_path / "keras"
    _images(keras / "cat", 3)
    _images(keras / "dog", 2, gray=True)
    scan = scan_folder(keras)
    assert (scan.train, scan.val, scan.test) == (keras, None, None)
    assert scan.train_counts == {"cat": 3, "dog": 2} and scan.image_size == 37
    assert looks_like_folder(keras)
    assert looks_like_folder(_folder(tmp_path / "imagenet", {"x": 1, "y": 1}))
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte").write_bytes(b"\0" * 16)
    (tmp_path / "texts" / "a").mkdir(parents=True)
    (tmp_path / "texts" / "a" / "x.txt").write_text("words")
    assert not looks_like_folder(tmp_path / "idx")
    assert not looks_like_folder(tmp_path / "texts")
    assert not looks_like_folder(tmp_path / "missing")
    assert not looks_like_folder(keras / "cat" / "0.png")
    with pytest.raises(DataError, match=r"missing does not exist: give the folder that holds "
                       r"your images, laid out as DIR/train/<class>/"):
        scan_folder(tmp_path / "missing")


def test_split_folders_are_found_as_downloads_name_them(tmp_path: Path) -> None:
    """Kaggle's Train/ and Test/, Roboflow's valid/: splits, not two classes named so."""
    root = tmp_path / "kaggle"
    for split in ("Train", "valid", "Testing"):
        _images(root / split / "cat", 2)
        _images(root / split / "dog", 2)
    scan = scan_folder(root)
    assert (scan.train, scan.val, scan.test) == (root / "Train", root / "valid",
                                                 root / "Testing")
    assert scan.classes == ["cat", "dog"]
    (root / "train").mkdir()  # a second train folder: which one is meant?
    with pytest.raises(DataError, match=r"2 train folders .*: keep one"):
        scan_folder(root)


def test_a_class_named_as_a_split_is_an_error_and_an_unlabelled_split_a_warning(
        tmp_path: Path) -> None:
    """DIR/<class>/ with a class named as a split: an error (it used to train a "test"
    class). Kaggle's unlabelled test/ (images, no class folders) beside train/<class>/:
    not used, and said so (it was silently ignored)."""
    keras = tmp_path / "keras"
    _images(keras / "cat", 3)
    _images(keras / "Test", 3)
    errors, _ = folder_problems(scan_folder(keras), 16, 1, 0.01)
    assert any("Test is named as a split folder" in e for e in errors)
    loose = _folder(tmp_path / "loose", {"a": 3, "b": 3})
    _images(loose / "test", 2)
    scan = scan_folder(loose)
    assert scan.test is None and scan.unlabelled == (loose / "test",)
    errors, warns = folder_problems(scan, 16, 1, 0.01)
    assert errors == []
    assert any(f"{loose / 'test'} has no class folders, so it is not used" in w for w in warns)


def test_a_link_loop_is_refused_not_followed(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    (root / "train" / "a" / "again").symlink_to(root / "train")
    with pytest.raises(DataError, match=r"a folder met before .* remove that link"):
        scan_folder(root)
    (root / "train" / "a" / "again").unlink()
    (root / "train" / "b" / "self").symlink_to(root / "train" / "b" / "self")  # ELOOP
    with pytest.raises(DataError, match=r"self: .*remove that link"):
        scan_folder(root)


def test_images_of_unread_kinds_are_counted_and_said(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3})
    for i in range(2):
        (root / "train" / "a" / f"{i}.HEIC").write_bytes(b"phone photo")
    (root / "train" / "b" / "x.gif").write_bytes(b"GIF89a")
    (root / "train" / "b" / "labels.csv").write_text("not an image of any kind")
    scan = scan_folder(root)
    assert scan.other_images == {".heic": 2, ".gif": 1}
    _, warns = folder_problems(scan, 16, 1, 0.01)
    assert any("2 .heic files, 1 .gif file in the class folders" in w for w in warns)


def test_why_a_path_is_not_a_folder_of_images(tmp_path: Path) -> None:
    from resnetlab.data.scan import not_a_folder

    assert "does not exist" in not_a_folder(tmp_path / "photso")
    _images(tmp_path / "flat", 3)
    assert "has no class folders (3 images lie in it directly)" in \
        not_a_folder(tmp_path / "flat")
    (tmp_path / "phone" / "cat").mkdir(parents=True)
    (tmp_path / "phone" / "cat" / "1.heic").write_bytes(b"phone photo")
    said = not_a_folder(tmp_path / "phone")
    assert "hold no images of the kinds read" in said and "1 .heic file" in said


def test_scan_names_unreadable_files_and_leaves_them_uncounted(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3}, val={"a": 1, "b": 1})
    bad = root / "train" / "b" / "x.png"
    bad.write_bytes(b"not an image")
    scan = scan_folder(root)
    assert scan.unreadable == [f"{bad}: not a recognised image format"]
    assert scan.unreadable_paths == {str(bad)}
    assert scan.train_counts == {"a": 3, "b": 3} and scan.checked == 9


def test_scan_is_cached_until_a_folder_changes(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    first = scan_folder(root)
    assert scan_folder(root) is first
    Image.new("RGB", (8, 8)).save(root / "train" / "a" / "new.png")
    again = scan_folder(root)
    assert again is not first and again.train_counts == {"a": 3, "b": 2}


def test_a_large_folder_is_sampled_with_a_fixed_seed(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scan_module, "SAMPLE_ABOVE", 10)
    monkeypatch.setattr(scan_module, "SAMPLE_SIZE", 4)
    root = _folder(tmp_path / "d", {"a": 6, "b": 6})
    sampled = scan_folder(root)
    assert not sampled.checked_all and sampled.checked == 4 and sampled.n_train == 12
    monkeypatch.setattr(scan_module, "_CACHE", {})  # a second scan, not the cached one
    assert scan_folder(root) == sampled


# ----------------------------------------------------------------------------- problems

def test_every_problem_is_in_one_error_and_warnings_do_not_stop(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3, "c": 3, "empty": 0},
                   val={"a": 1, "zebra": 1}, test={"a": 1, "b": 1, "c": 1})
    (root / "train" / "empty").mkdir(exist_ok=True)
    for i in range(2):
        (root / "train" / "a" / f"bad{i}.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING"), pytest.raises(DataError) as err:
        build_data(_cfg(root, image_size=4), 2, 2, 0, min_size=8)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{root} has 4 problems:"
    assert lines[1:] == [
        f"- class empty in {root / 'train'} holds no images: add some or remove the folder",
        f"- {root / 'val'} has classes ['zebra'] that train/ lacks: rename or remove them",
        f"- 2 of 16 image files cannot be read, more than data.max_bad_fraction=0.01 "
        f"({root / 'train' / 'a' / 'bad0.png'}: not a recognised image format, "
        f"{root / 'train' / 'a' / 'bad1.png'}: not a recognised image format): fix or remove "
        "them, or raise data.max_bad_fraction",
        "- data.image_size=4 is smaller than the model's total stride 8: its last feature map "
        "would be empty; set data.image_size >= 8 or choose a CIFAR-style model (resnet20)"]
    # What does not stop a run is said once, in the log, not in the error.
    assert _warned(caplog, "val/ has no images of ['b', 'c', 'empty']") == 1


def test_a_folder_with_only_warnings_builds(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "d", {"a": 4, "b": 4, "c": 4}, val={"a": 2, "c": 2})
    (root / "train" / "c" / "bad.png").write_bytes(b"not an image")
    (root / "train" / "c" / "._0.png").write_bytes(b"macOS litter")  # hidden: no sample
    with caplog.at_level("WARNING"):
        data = build_data(_cfg(root, max_bad_fraction=0.1), 2, 2, 0, min_size=8)
    assert _warned(caplog, "val/ has no images of ['b']; their accuracy is not measured") == 1
    assert _warned(caplog, "1 of 17 image files cannot be read and are left out") == 1
    assert data.classes == ["a", "b", "c"] and len(data.train_eval.dataset) == 12


def test_one_class_and_nothing_to_test_on_are_problems(tmp_path: Path) -> None:
    root = tmp_path / "keras"
    _images(root / "only", 3)
    with pytest.raises(DataError) as err:
        build_data(_cfg(root), 2, 2, 0)
    assert str(err.value) == (
        f"{root} has 2 problems:\n"
        f"- {root} has 1 class folder; a classifier needs at least 2: lay images out as "
        "DIR/train/<class>/ (optionally with DIR/val/<class>/) or DIR/<class>/\n"
        f"- {root} has no val/ or test/ folder and data.val_split is 0, so nothing is left to "
        "test on: add a val/ folder of class sub-folders (or more images: a class of one image "
        "cannot spare one), or set data.val_split=N")


def test_many_unreadable_files_are_named_five_then_counted(tmp_path: Path) -> None:
    bad = [f"/d/train/a/{i}.png: not a recognised image format" for i in range(7)]
    scan = FolderScan(tmp_path, tmp_path / "train", None, None, ["a", "b"],
                      {"a": 500, "b": 493}, {}, {}, 32, bad, True, checked=1000)
    errors, warns = folder_problems(scan, 32, 1, 0.01)
    assert errors == [] and len(warns) == 1
    assert warns[0].startswith("7 of 1000 image files cannot be read and are left out (")
    assert all(b in warns[0] for b in bad[:5]) and bad[5] not in warns[0]
    assert warns[0].endswith(f"{bad[4]} and 2 more): fix or remove them")
    errors, warns = folder_problems(scan, 32, 1, 0.005)
    assert warns == [] and len(errors) == 1 and "raise data.max_bad_fraction" in errors[0]
    # Without `checked`, the files counted plus the unreadable ones: 993 + 7.
    unsaid = FolderScan(tmp_path, tmp_path / "train", None, None, ["a", "b"],
                        {"a": 500, "b": 493}, {}, {}, 32, bad, True)
    assert folder_problems(unsaid, 32, 1, 0.01)[1][0].startswith("7 of 1000 image files")


# ------------------------------------------------------------------------------- splits

def test_stratified_holdout_takes_every_class_in_proportion() -> None:
    labels = [0] * 2 + [1] * 3 + [2] * 50 + [3] * 44 + [4] * 1
    train, val = stratified_holdout(labels, 10)
    held = Counter(labels[i] for i in val.tolist())
    assert held == {0: 1, 1: 1, 2: 4, 3: 4}  # a one-image class keeps its image
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(len(labels)))
    kept = Counter(labels[i] for i in train.tolist())
    assert all(kept[c] >= 1 for c in range(5))  # never a class's last image
    again = stratified_holdout(labels, 10)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    big = Counter(labels[i] for i in stratified_holdout(labels, 40)[1].tolist())
    assert big == {0: 1, 1: 1, 2: 20, 3: 18}
    with pytest.raises(ConfigError, match=r"data.val_split=3 is fewer than the 4 classes"):
        stratified_holdout(labels, 3)
    with pytest.raises(ConfigError, match=r"set data.val_split <= 95$"):
        stratified_holdout(labels, 96)


def test_stratified_holdout_of_a_folder(tmp_path: Path) -> None:
    keras = tmp_path / "keras"
    for k, n in enumerate((2, 5, 9)):
        _images(keras / f"kind{k}", n, colour=60 * k)
    cfg = _cfg(keras, val_split=4, stratified=True)
    data = build_data(cfg, 2, 2, 0)
    samples = data.train.dataset.dataset.samples
    val = set(data.val.dataset.indices)
    train = set(data.train.dataset.indices)
    assert not train & val and len(train | val) == 16 and len(val) == 4
    assert sorted(samples[i][1] for i in val) == [0, 1, 2, 2]
    assert data.test is data.val  # no val/ or test/: the hold-out tests too
    assert set(build_data(cfg, 2, 2, 0).val.dataset.indices) == val


def test_the_random_holdout_is_the_one_old_runs_drew(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 8, "b": 8}, val={"a": 1, "b": 1})
    bad = root / "train" / "a" / "3x.png"  # sorts among a's files: index 4 of 17
    bad.write_bytes(b"not an image")
    data = build_data(_cfg(root, val_split=5, max_bad_fraction=0.2), 2, 2, 0)
    files = [p for p, _ in data.train.dataset.dataset.samples]
    assert str(bad) not in files and len(files) == 16
    full = sorted([*files, str(bad)], key=lambda p: (Path(p).parent.name, Path(p).name))
    old_train, old_val = holdout(17, 5)  # over the list ImageFolder gave before
    assert {files[i] for i in data.val.dataset.indices} == \
        {full[i] for i in old_val.tolist()} - {str(bad)}
    assert {files[i] for i in data.train.dataset.indices} == \
        {full[i] for i in old_train.tolist()} - {str(bad)}


def test_val_without_a_class_keeps_the_labels_of_train(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 3, "b": 3, "c": 3}, val={"a": 2, "c": 3})
    data = build_data(_cfg(root), 2, 2, 0)
    assert data.classes == ["a", "b", "c"]
    assert sorted(_labels(data.val)) == [0, 0, 2, 2, 2]  # c is 2, as in train, not 1


def test_which_data_validates_and_tests(tmp_path: Path) -> None:
    both = _folder(tmp_path / "both", {"a": 4, "b": 4}, val={"a": 1, "b": 1},
                   test={"a": 2, "b": 1})
    data = build_data(_cfg(both), 2, 2, 0)
    assert len(data.val.dataset) == 2 and len(data.test.dataset) == 3
    assert data.test is not data.val
    held = build_data(_cfg(both, val_split=2), 2, 2, 0)
    assert len(held.val.dataset) == 2 and held.val.dataset.indices  # a hold-out of train
    assert len(held.test.dataset) == 3  # test/ still tests
    val_only = _folder(tmp_path / "val_only", {"a": 4, "b": 4}, val={"a": 1, "b": 1})
    data = build_data(_cfg(val_only), 2, 2, 0)
    assert data.val is data.test and len(data.test.dataset) == 2
    held = build_data(_cfg(val_only, val_split=2), 2, 2, 0)
    assert held.val is not held.test and len(held.test.dataset) == 2  # val/ tests


# ----------------------------------------------------------------------- unreadable files

def test_an_unreadable_file_is_left_out_and_named_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _folder(tmp_path / "d", {"a": 5, "b": 5}, val={"a": 1, "b": 1})
    bad = root / "train" / "a" / "x.png"
    bad.write_bytes(b"not an image")
    # Its header reads but its pixels are cut off: only the loader can find it.
    whole = (root / "train" / "b" / "0.png").read_bytes()
    cut = root / "train" / "b" / "cut.png"
    cut.write_bytes(whole[:-40])
    cfg = _cfg(root, workers=2, max_bad_fraction=0.2)
    with caplog.at_level("WARNING"):
        data = build_data(cfg, 1, 1, 0)  # batches of one: every file in every epoch
        assert str(bad) not in [p for p, _ in data.train.dataset.dataset.samples]
        counts = [sum(len(y) for _, y in data.train.batches(epoch)) for epoch in (0, 1)]
    assert counts == [10, 10]  # 11 readable headers, one of them cut off
    assert _warned(caplog, str(bad)) == 1  # by the scan, before training
    assert _warned(caplog, f"skipping unreadable {cut}") == 1  # two epochs, two workers


def test_ten_crops_and_scales_of_a_folder_are_cut_from_the_whole_image(tmp_path: Path) -> None:
    """Paper sec. 3.4: the 10 crops are the corners and centre of the whole image resized to
    256/224 of the input size (not of the 224 centre crop), and multi-scale scores the whole
    image. A white top-left corner must reach the top-left crop's first pixel."""
    root = tmp_path / "d"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            pixels = np.zeros((70, 50, 3), np.uint8)  # 50 wide, 70 high
            pixels[:6, :6] = 255  # about 2 px once resized
            for i in range(2):
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")
    cfg = _cfg(root, image_size=16, normalize="channel")
    stats = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    x, _ = next(iter(build_data(cfg, 2, 40, 0, stats=stats, views="10crop").test.batches(0)))
    assert x.shape == (4, 10, 3, 16, 16)  # a tenth of the batch: ten views an image
    assert (x[0, 0, :, 0, 0] > 0.9).all()  # the corner of the whole image
    centre, _ = next(iter(build_data(cfg, 2, 8, 0, stats=stats).test.batches(0)))
    assert centre[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]  # the centre crop never reaches it
    x, _ = next(iter(build_data(cfg, 2, 8, 0, stats=stats, views="multiscale").test.batches(0)))
    assert x.shape == (1, 3, 22, 16)  # whole, shorter side 16, one image a batch

