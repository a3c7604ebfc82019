"""Inference backends behind one interface: `load_backend(weights, "auto")(images) -> logits`.

torch: the BN-folded model, channels_last, in inference mode. onnxruntime / openvino: the
graph `resnetlab export` writes, exported on first use into `<weights>/export/` (or a user
cache when the weights folder is read-only) and re-exported when the weights change.
`auto` takes the first available of openvino, onnxruntime, torch: the order of their
speeds in docs/performance.md. `onnxruntime-int8` runs the int8 graph that
`resnetlab export --format onnx-int8` calibrates (deploy/quantize.py); never chosen by auto.
A backend is an nn.Module, so `evaluate` scores it as is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..factory import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, load_model
from ..paths import cache_dir
from .export import FILENAMES, INPUT, ExportError, OpenVINORunner, export
from .fold import fold_batchnorm

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "onnxruntime-int8")
PREFERENCE = ("openvino", "onnxruntime", "torch")
_FORMAT = {"onnxruntime": "onnx", "openvino": "openvino"}
STAMP = "source.sha256"


class Backend(nn.Module):
    """Logits for a float32 NCHW batch, by whichever runtime `name` says."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], torch.Tensor],
                 model_config: ModelConfig, module: nn.Module | None = None) -> None:
        super().__init__()
        self.name, self.run, self.model_config = name, run, model_config
        self.module = module  # the torch backend's model (so its parameters are visible)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)


def available(name: str) -> bool:
    if name == "torch":
        return True
    name = name.removesuffix("-int8")
    mods = {"onnxruntime": ("onnxruntime", "onnxscript"), "openvino": ("openvino", "onnxscript")}
    return all(importlib.util.find_spec(m) is not None for m in mods[name])


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export_dir(weights: Path) -> Path:
    """`<weights>/export`, or a per-weights cache folder if that cannot be written."""
    own = weights / "export"
    try:
        own.mkdir(exist_ok=True)
        if os.access(own, os.W_OK):
            return own
    except OSError:
        pass
    return cache_dir() / "export" / _digest(weights / WEIGHTS_FILE)[:16]


def exported(weights: Path, fmt: str) -> Path:
    """The `fmt` graph of these weights, exported (and parity-checked) if missing or stale."""
    folder = export_dir(weights)
    path, stamp = folder / FILENAMES[fmt], folder / f"{fmt}.{STAMP}"
    digest = _digest(weights / WEIGHTS_FILE)
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return path
    log.info("exporting %s to %s (once per weights)", weights, fmt)
    export(weights, fmt, folder)
    stamp.write_text(digest + "\n")
    return path


def _torch_backend(weights: Path) -> Backend:
    model = load_model(weights)
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        return folded(x.contiguous(memory_format=torch.channels_last))

    return Backend("torch", run, model.model_config, folded)


def _ort_backend(weights: Path, config: ModelConfig, threads: int, int8: bool = False
                 ) -> Backend:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if int8:  # calibration needs training data: `resnetlab export --format onnx-int8` makes it
        path = export_dir(weights) / "model.int8.onnx"
        if not path.is_file():
            raise ConfigError(f"no int8 graph for {weights}: run `resnetlab export RUN_DIR "
                              "--format onnx-int8` first (it calibrates on training images)")
    else:
        path = exported(weights, "onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {INPUT: arr})[0])

    return Backend("onnxruntime-int8" if int8 else "onnxruntime", run, config)


def _openvino_backend(weights: Path, config: ModelConfig, threads: int) -> Backend:
    props: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        props["INFERENCE_NUM_THREADS"] = threads
    infer = OpenVINORunner(exported(weights, "openvino"), props)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(infer(np.ascontiguousarray(x.detach().cpu().numpy(),
                                                           dtype=np.float32)))

    return Backend("openvino", run, config)


def load_backend(weights: str | os.PathLike[str], backend: str = "auto",
                 threads: int = 0) -> Backend:
    """The model in the weights directory `weights`, on `backend` (see BACKENDS)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    wdir = Path(weights)
    config = ModelConfig.from_json(wdir / CONFIG_FILE)  # not weights: say so before exporting
    names = [n for n in PREFERENCE if available(n)] if backend == "auto" else [backend]
    if not available(names[0]):
        raise ConfigError(f"backend {backend} is not installed: pip install 'resnetlab[deploy]'")
    for name in names:
        try:
            if name == "torch":
                return _torch_backend(wdir)
            if name.startswith("onnxruntime"):
                return _ort_backend(wdir, config, threads, int8=name.endswith("int8"))
            return _openvino_backend(wdir, config, threads)
        except ExportError as e:
            if backend != "auto":
                raise
            log.warning("backend %s unavailable for %s (%s); trying the next", name, wdir, e)
    raise AssertionError("unreachable: the torch backend always loads")
