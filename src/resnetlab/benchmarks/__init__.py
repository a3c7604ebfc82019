"""Benchmarks: `resnetlab bench NAME` or `python bench/NAME.py`; see docs/performance.md."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "train": ("train", "training images/s against a plain eager DataLoader stack"),
    "infer": ("infer", "inference images/s: torchvision eager, our backends, ORT, OpenVINO"),
    "data": ("data", "data pipelines' samples/s against what the training step consumes"),
    "time-to-accuracy": ("accuracy", "wall time of the demo preset to 90/92/93/94% accuracy"),
}


def run_benchmark(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"{__name__}.{BENCHMARKS[name][0]}")
    return int(module.main(argv))
