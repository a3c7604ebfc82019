"""One served model: its backend, preprocessing, batcher and what the web page shows of it."""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..deploy.agreement import MIN_AGREEMENT
from ..deploy.backends import ImageSource
from ..deploy.predict import Predictor
from ..models.complexity import count_params
from ..models.config import ModelConfig
from ..models.factory import create_model
from ..report import MetricsLog
from ..runs import RunDir, weights_dir
from .batcher import Batcher
from .v2 import Signature

log = logging.getLogger(__name__)


def best_batch(forward: Any, shape: tuple[int, ...], max_batch: int,
               seconds: float = 0.25, rounds: int = 2) -> tuple[int, dict[int, float]]:
    """Images/s of `forward` at batch 1, 2, 4, ... max_batch, and the size to serve. On a CPU
    a larger batch need not pay (resnet50 at 224 ran slower at 32 than at 1 on an AMX Xeon),
    so the server batches up to what was measured best here, not up to --max-batch.

    Each size's rate is the best of `rounds` passes over all sizes: one pass of a quarter
    second per size picked batch 8 or 32 for resnet20 from run to run (2 cores, AMD EPYC),
    as a moment's interference dented one size or another."""
    rates: dict[int, float] = {}
    sizes = [2 ** i for i in range(max_batch.bit_length()) if 2 ** i < max_batch] + [max_batch]
    for size in sizes:
        forward(np.zeros((size, *shape), np.float32))  # first call at a shape: plans for it
    for _ in range(rounds):
        for size in sizes:
            x = np.zeros((size, *shape), np.float32)
            n, start = 0, time.perf_counter()
            while n < 2 or time.perf_counter() - start < seconds:
                forward(x)
                n += 1
            rates[size] = max(rates.get(size, 0.0), size * n / (time.perf_counter() - start))
    # The largest size within 5% of the best. Served, each pass also pays for its share of
    # the event loop and the hop to the inference thread, which a hot loop does not see:
    # resnet20 at 32 clients served 780 images/s in batches of 8 and 1,100 in batches of 32
    # (torch, 2 cores), sizes this loop found 6% apart. Light load is not slowed by a large
    # cap, as a batch takes only the requests that are about.
    top = max(rates.values())
    return max(s for s, r in rates.items() if r >= 0.95 * top), rates


def preprocessing(cfg: ModelConfig) -> dict[str, str | float]:
    """How an image becomes the v2 input: what Predictor.preprocess does, for clients that
    preprocess themselves (the v2 model metadata's `parameters`). The protocol allows only
    strings, numbers and booleans there, so mean and std are JSON: [C] per channel, or
    [C, H, W] for the paper's per-pixel mean."""
    return {"layout": "NCHW", "datatype": "FP32",
            "color": {1: "L", 3: "RGB"}.get(cfg.in_chans, f"R repeated {cfg.in_chans} times"),
            "input_size": cfg.input_size, "crop_pct": cfg.resolved_crop_pct,
            "interpolation": cfg.interpolation, "pixel_range": "0-255",
            "normalization": "x = (pixel / 255 - mean) / std",
            "mean": json.dumps(cfg.mean), "std": json.dumps(cfg.std)}


class ThreadChoice:
    """Intra-op threads for each batch size (rounded up to a power of two), chosen from the
    forward passes the server times while it serves: the first `trials` batches of a size
    alternate between one thread and all cores, the rest use whichever took less time.

    Why measure while serving: a hot loop on an idle machine favours all cores, but served
    passes alternate with the HTTP side (and, on loopback, the clients) on the same cores.
    On 2 cores (AMD EPYC Zen 4) resnet20 at batch 1 took 1.1 ms with two threads and 1.7
    with one in a hot loop, yet 4.1 against 2.4 ms inside the server (each thread's wake-up
    and barrier waits on a shared core); resnet50 still ran 1.5x faster with two."""

    def __init__(self, cores: int, trials: int = 8) -> None:
        self.options = (1, cores) if cores > 1 else (1,)
        self.trials = trials
        self.seconds: dict[int, dict[int, list[float]]] = {}
        self.chosen: dict[int, int] = {}

    @staticmethod
    def size_class(n: int) -> int:
        return 1 << max(0, n - 1).bit_length()

    def pick(self, n: int) -> int:
        c = self.size_class(n)
        if c in self.chosen:
            return self.chosen[c]
        seen = self.seconds.setdefault(c, {t: [] for t in self.options})
        return min(self.options, key=lambda t: len(seen[t]))  # the less tried one

    def record(self, n: int, threads: int, seconds: float) -> None:
        c = self.size_class(n)
        if c in self.chosen:
            return
        seen = self.seconds[c]
        seen[threads].append(seconds / n)
        if all(len(v) >= self.trials for v in seen.values()):
            self.chosen[c] = min(self.options, key=lambda t: statistics.median(seen[t]))
            log.info("batches of up to %d: %d intra-op thread(s) (median ms per image: %s)",
                     c, self.chosen[c], ", ".join(
                         f"{t} thread(s) {1000 * statistics.median(v):.2f}"
                         for t, v in seen.items()))


class ServedModel:
    """A run or weights directory behind the batcher, at the backend and precision asked.

    Args:
        name: the name clients use (`/v2/models/<name>`).
        weights: a run directory, or a weights directory written by `save_weights`.
        backend: `auto`, `torch`, `onnxruntime`, `openvino` (or `onnxruntime-int8`, the
            same as onnxruntime at int8); `auto`: the fastest one installed.
        precision: `auto`, `fp32`, `bf16` or `int8`; a reduced one only after its top-1
            agreement with fp32 is checked on `check` (or the run's test images).
        check: images to check a reduced precision on; None: the run's own.
        max_batch: the largest batch concurrent requests are gathered into.
        max_wait_ms: how long the first request of a batch waits for others.
        max_queue: images waiting at most (at least a batch); more are answered 503.
        probe: measure images/s per batch size at start and keep the best batch.
        threads: the torch backend's intra-op threads; None chooses them per batch size
            while serving, 0 leaves torch's own setting. Other backends keep their
            runtime's threads.
        min_agreement: the top-1 agreement with fp32 a reduced precision must reach.

    Raises:
        WeightsError: `weights` is not a run or weights directory.
        ConfigError: an unknown backend or precision, or one that failed its check.
        ExportError: the backend asked for could not export the weights.
    """

    def __init__(self, name: str, weights: str | os.PathLike[str], backend: str = "auto",
                 precision: str = "auto", check: ImageSource | None = None,
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 256,
                 probe: bool = True, threads: int | None = None,
                 min_agreement: float = MIN_AGREEMENT) -> None:
        self.name, self.weights = name, weights_dir(weights)
        self.predictor = Predictor(self.weights, backend, precision, check, min_agreement)
        self.threads: ThreadChoice | int = 0
        cfg = self.predictor.model.model_config
        self.config = cfg
        self.signature = Signature((cfg.in_chans, cfg.input_size, cfg.input_size),
                                   cfg.num_classes)
        self.preprocessing = preprocessing(cfg)
        self.batch_rates: dict[int, float] = {}
        batch = max_batch
        if probe and max_batch > 1:
            batch, self.batch_rates = best_batch(self.forward, self.signature.chw, max_batch)
            log.info("%s: batches of up to %d (images/s by batch size: %s)", name, batch,
                     ", ".join(f"{k}: {v:.0f}" for k, v in self.batch_rates.items()))
        self.batcher = Batcher(self.forward, batch, max_wait_ms, max(max_queue, batch))
        if self.predictor.model.name == "torch":  # chosen after the probe's hot loop
            self.threads = ThreadChoice(torch.get_num_threads()) if threads is None \
                else threads
        elif threads:
            log.warning("%s: %s keeps its own threads; the thread count %d applies to the "
                        "torch backend", name, self.predictor.model.name, threads)

    @property
    def platform(self) -> str:
        m = self.predictor.model
        return f"resnetlab-{m.name}-{m.precision}"

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32) of a preprocessed float32 batch."""
        choice = self.threads
        threads = choice.pick(len(x)) if isinstance(choice, ThreadChoice) else choice
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.predictor.model(torch.from_numpy(x)).float().numpy()
        if isinstance(choice, ThreadChoice):
            choice.record(len(x), threads, time.perf_counter() - start)
        return out

    def preprocess(self, data: bytes, filename: str) -> np.ndarray:
        """One uploaded image as the model's (1, C, H, W) input; ImageError if unreadable."""
        return self.predictor.preprocess(data, filename).numpy()

    def top(self, logits: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The k most probable classes of one image's logits."""
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p)[:max(1, min(k, len(p)))]
        names = self.predictor.classes
        return [{"label": names[i], "index": int(i), "prob": float(p[i])} for i in order]

    def threads_info(self) -> dict[str, int] | int | str:
        """Intra-op threads: by batch size when chosen while serving, else the setting."""
        choice = self.threads
        if isinstance(choice, ThreadChoice):
            chosen = dict(choice.chosen)  # a copy: the inference thread may add to it
            return {f"<={c}": t for c, t in sorted(chosen.items())} or "choosing"
        return choice or "runtime's own"

    def info(self) -> dict[str, Any]:
        """The page's model panel: architecture, size, the run's accuracy and curves."""
        cfg = self.config
        with torch.device("meta"):
            params = count_params(create_model(cfg.architecture, num_classes=cfg.num_classes,
                                               in_chans=cfg.in_chans, **cfg.overrides))
        m = self.predictor.model
        out: dict[str, Any] = {
            "name": self.name, "architecture": cfg.architecture, "parameters": params,
            "input": list(self.signature.chw), "classes": self.predictor.classes,
            "backend": m.name, "precision": m.precision, "max_batch": self.batcher.max_batch,
            "max_wait_ms": self.batcher.max_wait_ms, "weights": str(self.weights),
            "threads": self.threads_info()}
        run = RunDir.around(self.weights)
        if run is not None:
            out.update(_run_panel(run))
        return out


def _run_panel(run: RunDir) -> dict[str, Any]:
    panel: dict[str, Any] = {"run": str(run.path)}
    try:
        report = json.loads(Path(run.eval_report).read_text())
        panel.update(test_accuracy=1 - float(report["top1_error"]),
                     per_class_accuracy=report.get("per_class_accuracy"),
                     confusion=report.get("confusion"), eval_view=report.get("tta"))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # an unfinished run has no eval.json: the panel shows what there is
    try:
        records = MetricsLog(run).records()
    except (OSError, ValueError):
        records = []
    train = [r for r in records if r.get("kind") == "train"]
    step = max(1, len(train) // 400)  # a curve the page draws, not every logged window
    panel["curves"] = {
        "train": [[r["iteration"], r.get("loss"), r.get("train_error")] for r in train[::step]],
        "test": [[r["iteration"], r["test_error"]] for r in records
                 if r.get("kind") == "eval" and r.get("test_error") is not None]}
    return panel

