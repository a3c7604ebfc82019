"""Data formats read from test-written files, the in-memory loader and augmentation."""

import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.data import DataConfig, build_data, holdout
from resnetlab.data.images import ImageError
from resnetlab.data.memory import BatchAugment, InMemoryLoader, Normalize
from resnetlab.data.sources import (
    ArrayDataset,
    DataError,
    download_fashion_mnist,
    load_cifar_split,
    load_idx_split,
    locate_fashion_mnist,
    md5sum,
)
from resnetlab.errors import ConfigError
from resnetlab.models.registry import IMAGENET_MEAN, IMAGENET_STD

from .conftest import synthetic_images, write_idx


def _md5_table(root: Path, names: list[str]) -> dict[str, str]:
    return {n: hashlib.md5((root / n).read_bytes()).hexdigest() for n in names}


@pytest.mark.parametrize("compress", [True, False])
def test_idx_files_load(tmp_path: Path, compress: bool) -> None:
    images, labels = synthetic_images(30, 0)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress)
    ds = load_idx_split(tmp_path, "train", [str(i) for i in range(10)], checksums=None)
    assert ds.images.shape == (30, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.tolist() == labels.tolist()


def test_idx_checksum_and_truncation_are_reported(tmp_path: Path) -> None:
    images, labels = synthetic_images(30, 0)
    write_idx(tmp_path / "train-images-idx3-ubyte", images, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, compress=False)
    with pytest.raises(DataError, match="MD5"):
        load_idx_split(tmp_path, "train", [], checksums={"train-images-idx3-ubyte": "0" * 32})
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_idx_split(tmp_path, "train", [], checksums=None)


def _write_cifar(root: Path, n_classes: int) -> dict[str, str]:
    rng = np.random.default_rng(0)
    if n_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            data = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, 4).tolist(),
                    b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                    b"filenames": [b"x.png"] * 4}
            (folder / name).write_bytes(pickle.dumps(data, protocol=2))
        meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_vis": 3072}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        return _md5_table(folder, [*names, "batches.meta"])
    folder = root / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        data = {b"fine_labels": rng.integers(0, 100, n).tolist(),
                b"coarse_labels": rng.integers(0, 20, n).tolist(),
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)}
        (folder / name).write_bytes(pickle.dumps(data, protocol=2))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"k{i}".encode() for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return _md5_table(folder, ["train", "test", "meta"])


@pytest.mark.parametrize("n_classes", [10, 100])
def test_cifar_python_batches_load(tmp_path: Path, n_classes: int) -> None:
    sums = _write_cifar(tmp_path, n_classes)
    train = load_cifar_split(tmp_path, n_classes, "train", sums)
    test = load_cifar_split(tmp_path, n_classes, "test", sums)
    assert train.images.shape == ((20 if n_classes == 10 else 6), 3, 32, 32)
    assert len(test) == (4 if n_classes == 10 else 3)
    assert train.classes[:2] == (["c0", "c1"] if n_classes == 10 else ["f0", "f1"])
    assert int(train.labels.max()) < n_classes
    bad = dict(sums, test_batch="0" * 32, test="0" * 32)
    with pytest.raises(DataError, match="MD5"):
        load_cifar_split(tmp_path, n_classes, "test", bad)


def test_cifar_hostile_pickle_never_runs(tmp_path: Path) -> None:
    _write_cifar(tmp_path, 10)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match="refusing"):
        load_cifar_split(tmp_path, 10, "test", checksums=None)
    assert not marker.exists()


def test_fashion_mnist_search_order_and_message(tmp_path: Path, fashion_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    assert locate_fashion_mnist(fashion_dir) == fashion_dir
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("resnetlab.data.sources.FASHION_MNIST_DEBIAN_DIR", tmp_path / "none")
    with pytest.raises(DataError, match="does not hold"):
        locate_fashion_mnist(tmp_path)
    monkeypatch.setattr("resnetlab.data.sources.FASHION_MNIST_URL", "http://127.0.0.1:9/")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        locate_fashion_mnist(None)
    cached = tmp_path / "cache" / "fashion-mnist"
    cached.mkdir(parents=True, exist_ok=True)  # the failed download may have made it
    for f in fashion_dir.iterdir():
        (cached / f.name).write_bytes(f.read_bytes())
    assert locate_fashion_mnist(None) == cached


def test_download_checks_md5(tmp_path: Path, fashion_dir: Path) -> None:
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *a, directory=str(fashion_dir), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        sums = {f.name: md5sum(f.read_bytes()) for f in fashion_dir.iterdir()}
        dest = download_fashion_mnist(tmp_path / "dl", url, sums)
        assert sorted(p.name for p in dest.iterdir()) == sorted(sums)
        bad = dict(sums, **{"t10k-labels-idx1-ubyte.gz": "0" * 32})
        (dest / "t10k-labels-idx1-ubyte.gz").unlink()
        with pytest.raises(DataError, match="MD5"):
            download_fashion_mnist(dest, url, bad)
        assert not (dest / "t10k-labels-idx1-ubyte.gz").exists()
    finally:
        server.shutdown()


def _labelled_constant_images(n: int) -> ArrayDataset:
    labels = torch.arange(n) % 10
    images = ((labels + 1) * 20).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 12, 12)
    return ArrayDataset(images.contiguous(), labels, [str(i) for i in range(10)])


def test_augmentation_keeps_labels_aligned() -> None:
    data = _labelled_constant_images(200)
    norm = Normalize([0.0, 0.0, 0.0], [1 / 255] * 3)  # undo the /255: values back in 0..255
    loader = InMemoryLoader(data, 32, norm, BatchAugment(pad=4, flip=True), seed=3)
    seen = 0
    for x, y in loader.batches(epoch=1):
        assert torch.allclose(x.amax(dim=(1, 2, 3)), ((y + 1) * 20).float(), atol=1e-3)
        # pad-4 crops of a 12x12 image keep at least 8x8 = 64 original pixels per channel
        assert ((x > 0).sum(dim=(2, 3)) >= 64).all()
        seen += len(y)
    assert seen == 192  # drop_last


def test_augmentation_crops_and_flips() -> None:
    x = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    out = BatchAugment(pad=1, flip=True)(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    flips = sum(torch.equal(o, x[0].flip(-1)) for o in out)
    same = sum(torch.equal(o, x[0]) for o in out)
    assert flips > 0 and same > 0 and flips + same < 64  # some shifted crops too


def test_resumed_epoch_draws_the_same_batches() -> None:
    data = _labelled_constant_images(100)
    norm = Normalize([0.5] * 3, [0.5] * 3)
    loader = InMemoryLoader(data, 16, norm, BatchAugment(), seed=7)
    full = list(loader.batches(2))
    tail = list(loader.batches(2, start=3))
    assert len(full) == 6 and len(tail) == 3
    for (a, ya), (b, yb) in zip(full[3:], tail, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(full[0][1], next(iter(loader.batches(3)))[1])


def test_holdout_is_disjoint_and_fixed() -> None:
    tr, va = holdout(50000, 5000)
    assert len(tr) == 45000 and len(va) == 5000
    assert len(set(tr.tolist()) | set(va.tolist())) == 50000
    assert torch.equal(holdout(50000, 5000)[1], va)
    # Pinned: the same examples are held out in every version, whatever the run's seed,
    # so validation numbers of old and new runs compare. Both parts come sorted.
    assert [t.tolist() for t in holdout(10, 3)] == [[0, 2, 4, 5, 6, 8, 9], [1, 3, 7]]
    assert holdout(10, 0)[0].tolist() == list(range(10)) and len(holdout(10, 0)[1]) == 0
    for bad in (-1, 10):
        # names the setting (issue 16, item 5: the folder preset's users met a bare name)
        with pytest.raises(ConfigError, match=rf"^data\.val_split must be in \[0, 10\) for a "
                           rf"training set of 10 examples, got {bad}; set it with --set "):
            holdout(10, bad)


def test_pixel_and_channel_normalisation() -> None:
    imgs = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    for mode, shape in (("pixel", (3, 8, 8)), ("channel", (3, 1, 1))):
        n = Normalize.fit(imgs, mode)
        assert n.mean.shape == shape
        out = n(imgs)
        assert out.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        # In both modes the std is each channel's spread over the whole split.
        x = imgs.float() / 255
        torch.testing.assert_close(n.std.flatten(), x.std(dim=(0, 2, 3)))
        if mode == "channel":
            torch.testing.assert_close(out.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
        else:  # the paper's per-pixel mean: one value per channel and position
            torch.testing.assert_close(n.mean, x.mean(0))
        # What trained weights record (as_lists) rebuilds the same normaliser.
        assert torch.equal(Normalize(*n.as_lists())(imgs), out)
    with pytest.raises(ValueError, match="'channel' or 'pixel'"):
        Normalize.fit(imgs, "global")
    # float32 out whatever torch's default dtype is (a notebook may have set float64).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert Normalize([0.5], [0.25])(imgs).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


def test_in_memory_hold_out_is_disjoint_and_the_normaliser_sees_train_only(
        tmp_path: Path) -> None:
    """The 5k held out of CIFAR's 50k (paper sec. 4.2) must not leak into the statistics:
    here the held-out images are made bright, so a leak would move the mean and std."""
    n, held = 200, 50
    tr, va = holdout(n, held)
    images, labels = synthetic_images(n, 3)
    images[va.numpy()] = 250
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[:20])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[:20])
    cfg = DataConfig(data_dir=str(tmp_path), verify=False, val_split=held)
    data = build_data(cfg, batch_size=10, eval_batch_size=10, seed=0)
    full = torch.from_numpy(images).unsqueeze(1)
    assert torch.equal(data.train.data.images, full[tr])
    assert torch.equal(data.val.data.images, full[va])
    assert not set(tr.tolist()) & set(va.tolist()) and len(tr) + len(va) == n
    x = full[tr].float() / 255
    assert data.mean == pytest.approx([x.mean().item()], abs=1e-6)
    assert data.std == pytest.approx([x.std().item()], abs=1e-6)
    assert (full.float() / 255).mean().item() - data.mean[0] > 0.1  # what a leak would add
    # The loaders normalise with those statistics: the training images come out centred.
    xs = torch.cat([b for b, _ in data.train_eval.batches(0)])
    assert abs(xs.mean().item()) < 1e-3 and xs.std().item() == pytest.approx(1, abs=1e-3)


def test_folder_hold_out_is_disjoint_from_what_trains(folder_dir: Path) -> None:
    cfg = DataConfig(dataset="folder", data_dir=str(folder_dir), val_split=40, image_size=28,
                     workers=0)
    data = build_data(cfg, batch_size=32, eval_batch_size=32, seed=0)
    files = [s[0] for s in data.train.dataset.dataset.samples]
    assert len(files) == 640

    def names(loader: object) -> set[str]:
        subset = loader.dataset  # type: ignore[attr-defined]
        return {files[i] for i in subset.indices}

    train, val, plain = names(data.train), names(data.val), names(data.train_eval)
    assert len(train) == 600 and len(val) == 40 and not train & val
    assert plain == train  # BN re-estimation reads the training images, never the held-out
    # ... every one of them, in batches larger than the split too (shuffling it dropped the
    # last partial batch: nothing at all below one batch).
    whole = build_data(cfg, 32, 1000, 0)
    assert sum(len(y) for _, y in whole.train_eval.batches(0)) == 600
    assert len(data.train) == 600 // 32 and len(data.val) == 2
    x, y = next(iter(data.val.batches(0)))  # un-augmented images of the held-out files
    assert x.shape == (32, 3, 28, 28) and y.tolist() == sorted(y.tolist())


def test_build_data_for_fashion_layout(fashion_dir: Path) -> None:
    cfg = DataConfig(data_dir=str(fashion_dir), verify=False, val_split=40)
    data = build_data(cfg, batch_size=64, eval_batch_size=100, seed=0)
    assert len(data.train.data) == 600 and len(data.val.data) == 40 and len(data.test.data) == 256
    x, y = next(iter(data.train.batches(0)))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (64,)
    assert data.in_chans == 1 and data.input_size == 28 and len(data.classes) == 10


def _image_folders(root: Path, broken: int) -> Path:
    for split, n in (("train", 6), ("val", 2)):
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (40 + i, 30), colour).save(d / f"{i}.jpg")
    for i in range(broken):
        (root / "train" / "cat" / f"broken{i}.jpg").write_bytes(b"not an image")
    (root / "val" / "dog" / "zz-broken.png").write_text("not an image either")
    return root


def test_build_data_for_image_folders(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _image_folders(tmp_path, 1)
    (root / "val" / "empty-class").mkdir()  # labels nothing: no problem
    cfg = DataConfig(dataset="folder", data_dir=str(root), val_split=0,
                     image_size=24, workers=0, max_bad_fraction=0.2)
    with caplog.at_level("WARNING"):  # the scan names the bad file before training
        data = build_data(cfg, batch_size=4, eval_batch_size=4, seed=0)
    assert data.classes == ["cat", "dog"]
    assert str(root / "train" / "cat" / "broken0.jpg") in caplog.text
    seen = [(x.shape, y.tolist()) for x, y in data.train.batches(0)]
    assert all(s[1:] == (3, 24, 24) for s, _ in seen)
    assert sum(len(y) for _, y in seen) >= 8  # the broken file is skipped, not fatal
    xs, ys = next(iter(data.test.batches(0)))
    assert xs.shape == (4, 3, 24, 24) and sorted(ys.tolist()) == [0, 0, 1, 1]
    with caplog.at_level("WARNING"):  # not strict unless asked: the bad file is skipped
        assert sum(len(y) for _, y in data.test.batches(0)) == 4


def test_too_many_unreadable_files_stop_with_a_count(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="folder", data_dir=str(_image_folders(tmp_path, 6)), val_split=0,
                     image_size=24, workers=2)
    # 6 broken in train/ and 1 in val/, of 23 files: the scan stops it before training.
    with pytest.raises(DataError, match=r"7 of 23 image files cannot be read, more than "
                       r"data.max_bad_fraction=0.01 "):
        build_data(cfg, batch_size=4, eval_batch_size=4, seed=0)


def test_strict_evaluation_names_the_first_bad_file(tmp_path: Path) -> None:
    cfg = DataConfig(dataset="folder", data_dir=str(_image_folders(tmp_path, 0)), val_split=0,
                     image_size=24, workers=2, max_bad_fraction=0.5)
    # The scan finds it before any loader runs; --strict refuses even one.
    with pytest.raises(DataError) as err:
        build_data(cfg, batch_size=4, eval_batch_size=4, seed=0, strict=True)
    bad = tmp_path / "val" / "dog" / "zz-broken.png"
    assert str(err.value) == f"{tmp_path} has 1 problem:\n- --strict stops at any " \
        f"unreadable file, and 1 of 17 cannot be read ({bad}: not a recognised image " \
        "format): fix or remove them, or run without --strict"


def test_build_data_for_mnist_idx(tmp_path: Path) -> None:
    for split, n in (("train", 50), ("t10k", 20)):
        images, labels = synthetic_images(n, 5)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", images, compress=False)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress=False)
    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path), verify=False, val_split=10)
    data = build_data(cfg, batch_size=8, eval_batch_size=8, seed=0)
    assert data.classes[:3] == ["0", "1", "2"] and len(data.test.data) == 20
    with pytest.raises(DataError, match="MD5"):
        build_data(DataConfig(dataset="mnist", data_dir=str(tmp_path), val_split=10), 8, 8, 0)


def test_folder_loaders_follow_the_settings(tmp_path: Path, folder_dir: Path) -> None:
    # Training shuffles in batches of batch_size; evaluation reads in folder order in batches
    # of eval_batch_size; channels_last and the colour augmentation's std reach the loaders.
    from resnetlab.data.folder import Lighting

    cfg = DataConfig(dataset="folder", data_dir=str(folder_dir), val_split=0, image_size=28,
                     workers=0, lighting=0.3)
    data = build_data(cfg, batch_size=32, eval_batch_size=50, seed=0, channels_last=True)
    x, y = next(iter(data.train.batches(0)))
    xe, ye = next(iter(data.train_eval.batches(0)))
    assert x.shape[0] == 32 and xe.shape[0] == 50 and len(data.train) == 640 // 32
    given = build_data(cfg, 32, 50, 0, stats=([0.1] * 3, [0.2] * 3))  # trained weights'
    assert (given.mean, given.std) == ([0.1] * 3, [0.2] * 3)
    # Both shuffled: the un-augmented pass (BN re-estimation, int8 calibration read its
    # first batches) in one fixed order, not the folder's class by class.
    assert y.tolist() != sorted(y.tolist()) and len(set(ye.tolist())) > 1
    assert torch.equal(ye, next(iter(data.train_eval.batches(0)))[1])
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, xe))
    steps = data.train.dataset.dataset.transform.transforms
    assert [t.alphastd for t in steps if isinstance(t, Lighting)] == [0.3]
    assert data.val is data.test  # val_split=0: val/ validates and tests, one loader
    # What trained weights record, so that evaluation and serving normalise alike.
    assert (data.in_chans, data.input_size) == (3, 28)
    assert (data.mean, data.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))


def test_strict_applies_to_evaluation_of_the_training_split_not_to_training(
        tmp_path: Path) -> None:
    root = _image_folders(tmp_path, 0)
    (root / "val" / "dog" / "zz-broken.png").unlink()
    # A truncated file: its header reads, so only the loader meets the fault.
    whole = (root / "train" / "cat" / "0.jpg").read_bytes()
    (root / "train" / "cat" / "broken0.jpg").write_bytes(whole[:-8])
    cfg = DataConfig(dataset="folder", data_dir=str(root), val_split=0, image_size=24,
                     workers=0, max_bad_fraction=0.5)
    data = build_data(cfg, batch_size=4, eval_batch_size=13, seed=0, strict=True)
    assert sum(len(y) for _, y in data.train.batches(0)) >= 11  # skipped, not fatal
    with pytest.raises(ImageError, match=str(root / "train" / "cat" / "broken0.jpg")):
        list(data.train_eval.batches(0))  # what --recompute-bn reads


def test_folder_setting_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^dataset=folder needs --data-dir with train/ and "
                       r"val/ sub-folders$"):
        build_data(DataConfig(dataset="folder"), 4, 4, 0)
    root = _image_folders(tmp_path, 0)
    (root / "val" / "cat").rename(root / "val" / "cow")
    with pytest.raises(DataError, match=r"val has classes \['cow'\] that train/ lacks: "
                       r"rename or remove them"):
        build_data(DataConfig(dataset="folder", data_dir=str(root), val_split=0), 4, 4, 0)


def test_in_memory_loaders_follow_the_settings(fashion_dir: Path) -> None:
    cfg = DataConfig(data_dir=str(fashion_dir), verify=False, val_split=40, limit_train=210,
                     limit_test=50, pad=0, flip=False)
    data = build_data(cfg, batch_size=32, eval_batch_size=50, seed=0, channels_last=True)
    # The limits apply before the hold-out: 210 -> 170 training, 40 held out; 50 test.
    # Training drops the last partial batch, evaluation keeps it.
    assert (len(data.train.data), len(data.val.data), len(data.test.data)) == (170, 40, 50)
    assert (len(data.train), len(data.train_eval), len(data.test)) == (5, 4, 1)
    assert data.train.augment is None  # neither crop nor flip asked for
    x, y = next(iter(data.train.batches(0)))
    xe, ye = next(iter(data.train_eval.batches(0)))
    assert x.shape[0] == 32 and xe.shape[0] == 50
    # (one channel is laid out alike either way, so the loaders' setting is what shows)
    assert all(ld.channels_last for ld in (data.train, data.train_eval, data.val, data.test))
    assert not torch.equal(y, data.train.data.labels[:32])  # shuffled, and so is ...
    assert not torch.equal(ye, data.train.data.labels[:50])  # ... the un-augmented pass
    assert torch.equal(ye, next(iter(data.train_eval.batches(0)))[1])  # one fixed order
    every = torch.cat([b for _, b in data.train_eval.batches(0)])
    assert torch.equal(every.sort().values, data.train.data.labels.sort().values)
    # Without augmentation an epoch is 160 of the normalised training images, shuffled.
    epoch = torch.cat([b for b, _ in data.train.batches(0)])
    want = Normalize(data.mean, data.std)(data.train.data.images)
    nearest = (epoch[:, None] - want[None]).abs().amax((2, 3, 4)).min(1).values
    assert epoch.shape[0] == 160 and nearest.max() < 1e-6
    assert data.val is not None and not data.val.shuffle and data.val.augment is None
    # Trained weights' statistics, when given, replace the fitted ones; with a crop asked
    # for, training is augmented and evaluation is not.
    given = build_data(DataConfig(data_dir=str(fashion_dir), verify=False, val_split=0,
                                  pad=2, flip=False), 32, 50, 0, stats=([0.5], [0.25]))
    assert (given.mean, given.std, given.val) == ([0.5], [0.25], None)
    assert not given.train.channels_last  # unless asked for
    assert given.train.augment is not None
    assert (given.train.augment.pad, given.train.augment.flip) == (2, False)
    flips = build_data(DataConfig(data_dir=str(fashion_dir), verify=False, val_split=0, pad=0),
                       32, 50, 0).train.augment
    assert flips is not None and (flips.pad, flips.flip) == (0, True)
    assert given.train_eval.augment is None and given.test.augment is None
    with pytest.raises(ConfigError, match=r"^batch_size 33 must divide by the 2 processes$"):
        build_data(cfg, 33, 8, 0, world=2)


def test_both_splits_are_checksummed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import resnetlab.data

    names = []
    for split, n in (("train", 50), ("t10k", 20)):
        images, labels = synthetic_images(n, 5)
        write_idx(tmp_path / f"{split}-images-idx3-ubyte", images, compress=False)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte", labels, compress=False)
        names += [f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"]
    sums = _md5_table(tmp_path, names)  # these files' own sums: all verify
    cfg = DataConfig(dataset="mnist", data_dir=str(tmp_path), val_split=10)
    monkeypatch.setattr(resnetlab.data, "MNIST_MD5", sums)
    assert len(build_data(cfg, 8, 8, 0).test.data) == 20
    for wrong in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        monkeypatch.setattr(resnetlab.data, "MNIST_MD5", {**sums, wrong: "0" * 32})
        with pytest.raises(DataError, match=f"{wrong}.*MD5|MD5.*{wrong}"):
            build_data(cfg, 8, 8, 0)


def test_data_parallel_ranks_split_each_global_batch(fashion_dir: Path) -> None:
    # Two ranks see the two halves of the batch one process would see (same seed, same
    # augmentation); evaluation shards the split instead.
    cfg = DataConfig(data_dir=str(fashion_dir), verify=False, val_split=0, limit_train=256)
    one = build_data(cfg, 32, 50, seed=5)
    halves = [build_data(cfg, 32, 50, seed=5, rank=r, world=2) for r in (0, 1)]
    x, y = next(iter(one.train.batches(0)))
    parts = [next(iter(h.train.batches(0))) for h in halves]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert not torch.equal(next(iter(build_data(cfg, 32, 50, seed=0).train.batches(0)))[1], y)
    shards = [sum(len(b) for b, _ in h.test.batches(0)) for h in halves]
    assert shards == [128, 128]


def test_folder_workers_live_across_epochs(folder_dir: Path) -> None:
    """Issue 16, item 9: the workers were started again every epoch, which cost more
    system time than training on a small folder. The same processes serve every epoch,
    and an epoch's batches are still those of a fresh loader (the epoch travels with the
    indices, not in the workers)."""
    cfg = DataConfig(dataset="folder", data_dir=str(folder_dir), val_split=0, image_size=28,
                     workers=2)
    data = build_data(cfg, batch_size=64, eval_batch_size=64, seed=0)
    pids = []
    epochs = []
    for epoch in (0, 1):
        epochs.append([y for _, y in data.train.batches(epoch)])
        pids.append(sorted(w.pid for w in data.train.loader._iterator._workers))
    assert len(pids[0]) == 2 and pids[0] == pids[1]
    fresh = build_data(cfg, batch_size=64, eval_batch_size=64, seed=0)
    assert all(torch.equal(a, b) for a, b in
               zip(epochs[1], [y for _, y in fresh.train.batches(1)], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(epochs[0], epochs[1], strict=True))
