"""Benchmarks, the one home of every speed claim: `resnetlab bench NAME`; docs/performance.md."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "train": ("train", "training images/s against a plain eager DataLoader stack"),
    "infer": ("infer", "inference images/s: torchvision eager, our backends, ORT, OpenVINO"),
    "data": ("data", "data pipelines' samples/s against what the training step consumes"),
    "time-to-accuracy": ("accuracy", "a preset's wall time to 90-95% test accuracy, over seeds"),
    "winograd": ("winograd", "how fast resnet50 at batch 1 could get with Winograd 3x3s"),
    "serve": ("serve", "resnetlab serve under load: batched against naive, on loopback"),
    "gpu-check": ("gpu_check", "the short check for a lent GPU machine (tools/gpu_check.sh)"),
}


def run_benchmark(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"{__name__}.{BENCHMARKS[name][0]}")
    return int(module.main(argv))
