import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under `make mutation`, fastest tests first. mutmut stops a mutant's run at its first
    failing test, so a mutant that a quick test kills no longer waits for slow tests that
    came first by chance; only survivors pay for every test."""
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from mutants/, beside it
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.exists():
        return
    seconds = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write `array` (uint8) in the IDX format of MNIST / Fashion-MNIST."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def synthetic_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Learnable 10-class images: class k lights up horizontal band k, plus noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    band = size // 10
    for i, k in enumerate(labels):
        images[i, k * band:(k + 1) * band + 1, 2:-2] = 220
    return images, labels


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small data set in the official Fashion-MNIST file layout (IDX, gzipped)."""
    root = tmp_path_factory.mktemp("fashion")
    for split, n, seed in (("train", 640, 1), ("t10k", 256, 2)):
        images, labels = synthetic_images(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture
def smoke_args(fashion_dir: Path) -> list[str]:
    """CLI arguments that run the smoke preset on the test-written files."""
    return ["--preset", "smoke", "--data-dir", str(fashion_dir), "--set", "data.verify=false"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> Path:
    """A finished smoke run, one per test module (modules write eval reports into it)."""
    from resnetlab.cli import main

    out = tmp_path_factory.mktemp("smokerun") / "run"
    assert main(["train", "--preset", "smoke", "--data-dir", str(fashion_dir), "--set",
                 "data.verify=false", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def folder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same kind of synthetic data as PNG files in the ImageNet folder layout."""
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    for split, n, seed in (("train", 640, 1), ("val", 64, 2)):
        images, labels = synthetic_images(n, seed)
        for i, (img, label) in enumerate(zip(images, labels, strict=True)):
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").convert("RGB").save(d / f"{i}.png")
    return root


def interrupt_at(monkeypatch: pytest.MonkeyPatch, iteration: int) -> None:
    """Make training raise KeyboardInterrupt (a Ctrl-C) when it asks for this iteration's lr."""
    from resnetlab.train.schedule import LRSchedule

    original = LRSchedule.__call__

    def interrupt(self: LRSchedule, it: int) -> float:
        if it == iteration:
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(LRSchedule, "__call__", interrupt)
