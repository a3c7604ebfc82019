"""`resnetlab bench data`: samples/s of each data pipeline against what training consumes.

Pipelines: the in-memory loader (whole-batch pad-crop-flip and normalisation) on
Fashion-MNIST-shaped and CIFAR-shaped arrays, the per-sample torchvision DataLoader the
reference training stack uses, and the image-folder loader (JPEG decode, random-resized
crop, flip, colour lighting) at 224x224. Consumption: the training step's images/s of the
model each pipeline feeds, under the trainer's allocator setting (allocator.py). A ratio well
above 1 means the data never keeps the step waiting.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.folder import FolderLoader, ImageFolderDataset, SeededSubset, train_transform
from ..data.memory import BatchAugment, InMemoryLoader, Normalize
from ..data.sources import ArrayDataset
from ..models.registry import IMAGENET_MEAN, IMAGENET_STD
from ..tables import format_table
from ..train.allocator import keep_freed_memory
from .common import machine, new_file, save
from .inputs import PILDataset, synthetic_arrays
from .train import resnetlab_step


def rate(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], seconds: float) -> float:
    """Samples/s drawn from `batches` over about `seconds` (after one warm-up batch)."""
    next(batches)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += len(next(batches)[1])
    return n / (time.perf_counter() - t0)


def in_memory(chans: int, size: int, batch: int) -> Iterator[Any]:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (batch * 40, chans, size, size), np.uint8))
    data = ArrayDataset(images, torch.zeros(len(images), dtype=torch.long), ["0"])
    loader = InMemoryLoader(data, batch, Normalize.fit(images, "channel"), BatchAugment(4, True),
                            channels_last=True)
    return itertools.chain.from_iterable(loader.batches(e) for e in itertools.count())


def reference_loader(chans: int, size: int, batch: int, workers: int) -> Iterator[Any]:
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    images, labels = synthetic_arrays(batch * 40, chans, size)
    tf = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True),
                     v2.Normalize([0.5] * chans, [0.25] * chans)])
    loader = DataLoader(PILDataset(images, labels, tf), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    return itertools.chain.from_iterable(loader for _ in itertools.count())


def folder(root: Path, batch: int, workers: int) -> Iterator[Any]:
    rng = np.random.default_rng(0)
    for i in range(batch * 3):
        d = root / "train" / f"c{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (300, 400, 3), np.uint8)).save(d / f"{i}.jpg")
    ds = ImageFolderDataset(root / "train", train_transform(224, IMAGENET_MEAN, IMAGENET_STD))
    loader = FolderLoader(SeededSubset(ds, list(range(len(ds)))), batch, True, True, workers)
    return itertools.chain.from_iterable(loader.batches(e) for e in itertools.count())


def consumption(step: Callable[[], int], seconds: float) -> float:
    step()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        n += step()
    return n / (time.perf_counter() - t0)


def run(seconds: float, workers: int, say: Callable[[str], None]) -> dict[str, Any]:
    keep_freed_memory()  # as the trainer does on the CPU
    res: dict[str, Any] = {"machine": machine(), "pipelines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "in-memory 28x28x1 (resnetlab)": (lambda: in_memory(1, 28, 128),
                                              lambda: resnetlab_step("resnet20", 1, 28, 128,
                                                                     1280, False)),
            "in-memory 32x32x3 (resnetlab)": (lambda: in_memory(3, 32, 128),
                                              lambda: resnetlab_step("resnet20", 3, 32, 128,
                                                                     1280, False)),
            f"per-sample DataLoader 32x32x3, {workers} workers (reference)": (
                lambda: reference_loader(3, 32, 128, workers),
                lambda: resnetlab_step("resnet20", 3, 32, 128, 1280, False)),
            f"image folder 224x224 JPEG, {workers} workers (resnetlab)": (
                lambda: folder(Path(tmp), 32, workers),
                lambda: resnetlab_step("resnet18", 3, 224, 32, 96, False)),
        }
        for name, (pipe, step) in cases.items():
            say(f"{name}: pipeline")
            r = rate(pipe(), seconds)
            say(f"{name}: training step it feeds")
            c = consumption(step(), seconds)
            res["pipelines"][name] = {"samples_per_s": r, "step_consumes_per_s": c,
                                      "headroom": r / c}
    return res


def report(res: dict[str, Any]) -> str:
    return format_table(["pipeline", "samples/s", "training step consumes/s", "headroom"], [
        [k, f"{v['samples_per_s']:.0f}", f"{v['step_consumes_per_s']:.0f}",
         f"{v['headroom']:.1f}x"] for k, v in res["pipelines"].items()], markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench data", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=5.0, help="time per measurement")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", type=new_file, help="write the results here (a new file)")
    args = p.parse_args(argv)
    res = run(args.seconds, args.workers, lambda s: print(s, flush=True))
    print(f"\n{res['machine']}")
    print(report(res))
    save(args.json, res)
    return 0
