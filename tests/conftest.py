import gzip
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

# `make test-robust` (docs/testing.md) reruns the tests marked `stochastic` under other
# seeds, the other training precision and a narrower instruction set. The first two reach a
# test only through the `variant` fixture, which every stochastic test must take; with
# RECORD_ENV set, each also appends what it measured to that file (JSON lines), from which
# tools/threshold_spread.py builds the distributions its thresholds are set against.
SEED_OFFSET_ENV = "RESNETLAB_TEST_SEED_OFFSET"
PRECISION_ENV = "RESNETLAB_TEST_PRECISION"
RECORD_ENV = "RESNETLAB_TEST_RECORD"
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Variant:
    """The seed and training precision a stochastic test runs with. By default seed 0 and
    fp32 on every CPU, so that `precision=auto` (bf16 on AMX and AVX512-BF16 CPUs) never
    decides what the default suite measures; `make test-robust` changes both."""

    seed: int
    precision: str
    test: str = ""

    @property
    def sets(self) -> list[str]:
        """The `--set` pairs that train with this variant."""
        return [f"seed={self.seed}", f"precision={self.precision}"]

    def record(self, **measured: float) -> None:
        """Note what the test measured, before it asserts on it."""
        path = os.environ.get(RECORD_ENV)
        if not path:
            return
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "native")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": self.test, "seed": self.seed,
                                "precision": self.precision, "isa": isa, **measured}) + "\n")


def _variant(test: str = "") -> Variant:
    precision = os.environ.get(PRECISION_ENV, "fp32")
    if precision not in PRECISIONS:
        raise pytest.UsageError(f"{PRECISION_ENV} must be one of {', '.join(PRECISIONS)}")
    return Variant(int(os.environ.get(SEED_OFFSET_ENV, "0")), precision, test)


@pytest.fixture
def variant(request: pytest.FixtureRequest) -> Variant:
    """`@pytest.mark.stochastic(precisions=["fp32"])` pins a test to the precisions named
    (its docstring says why); under another it is skipped."""
    v = _variant(request.node.nodeid)
    marker = request.node.get_closest_marker("stochastic")
    allowed = marker.kwargs.get("precisions", PRECISIONS) if marker else PRECISIONS
    if v.precision not in allowed:
        pytest.skip(f"pinned to {', '.join(allowed)}")
    return v


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A stochastic test that ignored the variant would pass `make test-robust` unchanged,
    so one that does not take the fixture is a collection error.

    Under `make mutation`, fastest tests first. mutmut stops a mutant's run at its first
    failing test, so a mutant that a quick test kills no longer waits for slow tests that
    came first by chance; only survivors pay for every test."""
    blind = [i.nodeid for i in items if i.get_closest_marker("stochastic")
             and "variant" not in getattr(i, "fixturenames", ())]
    if blind:
        raise pytest.UsageError(f"stochastic tests must take the `variant` fixture: {blind}")
    stats = Path("mutmut-stats.json")  # mutmut runs the tests from mutants/, beside it
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.exists():
        return
    seconds = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid, 0.0))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(_variant().seed)


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


def brightness_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """10 classes a net that pools globally learns within 100 steps: class k is noise on a
    background of brightness 22k. (The bands of synthetic_images tell classes apart by
    position alone, which global pooling hides: 40 smoke steps left 38-70% test error.)"""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 40, (n, size, size)) + 22 * labels[:, None, None]
    return images.astype(np.uint8), labels


def write_fashion_files(root: Path, make: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
                        ) -> Path:
    """640 training and 256 test images from `make(n, seed)`, in the official
    Fashion-MNIST file layout (IDX, gzipped)."""
    for split, n, seed in (("train", 640, 1), ("t10k", 256, 2)):
        images, labels = make(n, seed)
        write_idx(root / f"{split}-images-idx3-ubyte", images)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """synthetic_images as a small Fashion-MNIST."""
    return write_fashion_files(tmp_path_factory.mktemp("fashion"), synthetic_images)


@pytest.fixture(scope="session")
def brightness_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """brightness_images as a small Fashion-MNIST: a data set the smoke recipe learns."""
    return write_fashion_files(tmp_path_factory.mktemp("brightness"), brightness_images)


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
