"""Timing rules shared by the benchmarks.

Absolute speeds drift on shared machines, so every benchmark times its contenders in one
process, alternating them round by round after a warm-up, and reports medians and the
median of per-round ratios against its reference. It also measures the machine's sgemm
rate in the same run, so each result can be put as a fraction of what the CPU can do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..deploy.runtimes import served
from ..precision import infer_candidates, this_cpu, train_precision


def machine() -> dict[str, Any]:
    cpu = this_cpu()
    return {"cpu": cpu.model, "kind": cpu.kind, "flags": sorted(cpu.flags),
            "onednn_max_cpu_isa": cpu.onednn_cap or None, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def machine_report(measure: bool = True) -> dict[str, object]:
    """`machine()`, what `auto` picks for training and for each runtime, and (`measure`) the
    measured gemm rates."""
    cpu = this_cpu()
    out: dict[str, object] = {
        **machine(), "native_bf16": cpu.native_bf16, "native_int8": cpu.native_int8,
        "train_auto": train_precision("auto", torch.device("cpu"), cpu).precision,
        "infer_auto": {r.name: infer_candidates(r.precisions, cpu)[0] for r in served()},
    }
    if measure:
        out["sgemm_gflops"] = round(gemm_gflops(torch.float32), 1)
        out["bf16_gemm_gflops"] = round(gemm_gflops(torch.bfloat16), 1)
    return out


def _product_seconds(n: int, dtype: torch.dtype) -> float:
    """Seconds of one n x n product in `dtype`, after one untimed warm-up product."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    a @ b
    return time.perf_counter() - t


def gemm_gflops(dtype: torch.dtype = torch.float32, n_max: int = 2048, reps: int = 5,
                min_s: float = 0.05) -> float:
    """Best of `reps` n x n matrix products in `dtype`, in GFLOP/s: the practical peak of
    that precision (bf16 is fast only where the CPU has AMX or AVX512-BF16).

    n doubles from 256 until one product takes `min_s` or n reaches `n_max`: a precision
    the CPU only emulates (bf16 on an AVX2 CPU runs at about 1 GFLOP/s) is then measured
    in seconds instead of the minutes that 2048 x 2048 products would take.
    """
    n = 256
    while n * 2 <= n_max and _product_seconds(n, dtype) < min_s:
        n *= 2
    return max(2 * n ** 3 / _product_seconds(n, dtype) / 1e9 for _ in range(reps))


def sgemm_gflops() -> float:
    return gemm_gflops(torch.float32)


@dataclass
class Timing:
    """Items per second of one contender, one value per round."""

    name: str
    per_round: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.per_round)


def alternate(contenders: Mapping[str, Callable[[], int]], rounds: int, calls: int = 1,
              warmup: int = 1, progress: Callable[[str], None] | None = None,
              quiet_s: float = 0.0) -> dict[str, Timing]:
    """Time `calls` calls of each contender per round, rotating who goes first.

    Each contender returns how many items (images) one call processed. After each
    contender's round the machine is left idle for `quiet_s` seconds, untimed, so that
    background work it started (DataLoader workers refilling their queue) finishes before
    the next contender's clock starts instead of slowing it down.
    """
    for name, fn in contenders.items():
        if progress:
            progress(f"warm-up: {name}")
        for _ in range(warmup):
            fn()
    out = {name: Timing(name) for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0, items = time.perf_counter(), 0
            for _ in range(calls):
                items += contenders[name]()
            out[name].per_round.append(items / (time.perf_counter() - t0))
            time.sleep(quiet_s)
        if progress:
            progress(f"round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {out[n].per_round[-1]:.1f}/s" for n in names))
    return out


def ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a/b: paired, so a slow round slows both."""
    return statistics.median(x / y for x, y in zip(a.per_round, b.per_round, strict=True))


def new_file(path: str) -> str:
    """An argparse type for --json: a file not there yet, checked before the benchmark runs
    (its numbers are this machine's and this hour's: an earlier file is never written over)."""
    if Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path} exists; choose another --json, or move it "
                                         "away")
    return path


def save(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    return asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)
