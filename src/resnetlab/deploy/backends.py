"""Inference backends behind one interface: `load_backend(weights, "auto")(images) -> logits`.

torch: the BN-folded model, channels_last, in inference mode. onnxruntime / openvino: the
graph `resnetlab export` writes, exported on first use into `<weights>/export/` (or a user
cache when the weights folder is read-only) and re-exported when the weights change.
`auto` takes the first available of openvino, onnxruntime, torch: the order of their
speeds in docs/performance.md. Each runs at a stated precision (resnetlab.precision):
fp32; bf16 (openvino, torch); int8 (openvino, onnxruntime: the graph that `resnetlab
export --format onnx-int8` calibrates, deploy/quantize.py); or auto, the fastest the CPU
runs natively whose top-1 agreement with fp32 passes its check (deploy/agreement.py).
A backend is an nn.Module, so `evaluate` scores it as is.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..factory import CONFIG_FILE, WEIGHTS_FILE, ModelConfig, load_model
from ..paths import cache_dir
from ..precision import INFER_PRECISIONS, infer_candidates, supported
from . import agreement
from .agreement import MIN_AGREEMENT, Agreement, lookup
from .export import (
    FILENAMES,
    INPUT,
    INT8_FILE,
    ExportError,
    OpenVINORunner,
    export,
    openvino_props,
)
from .fold import fold_batchnorm

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnxruntime", "openvino", "onnxruntime-int8")
PREFERENCE = ("openvino", "onnxruntime", "torch")
STAMP = "source.sha256"
ImageSource = Callable[[], Iterable[torch.Tensor]]  # batches of preprocessed test images


class Backend(nn.Module):
    """Logits (float32) for a float32 NCHW batch, by the runtime `name` at `precision`."""

    def __init__(self, name: str, run: Callable[[torch.Tensor], torch.Tensor],
                 model_config: ModelConfig, module: nn.Module | None = None,
                 precision: str = "fp32") -> None:
        super().__init__()
        self.name, self.run, self.model_config = name, run, model_config
        self.precision = precision
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


def _settings(fmt: str) -> str:
    """What besides the weights decides an export's outcome: the runtime's version."""
    module = {"onnx": "onnxruntime", "openvino": "openvino"}.get(fmt)
    return f"{module} {importlib.metadata.version(module)}" if module else fmt


def exported(weights: Path, fmt: str) -> Path:
    """The `fmt` graph of these weights, exported (and parity-checked) if missing or stale.

    A failed export is recorded (`<fmt>.failed`) and not retried until the weights or the
    runtime's version change: `auto` would otherwise redo a doomed export on every call.
    """
    folder = export_dir(weights)
    path, stamp, failed = (folder / FILENAMES[fmt], folder / f"{fmt}.{STAMP}",
                           folder / f"{fmt}.failed")
    digest = _digest(weights / WEIGHTS_FILE)
    key = {"weights_sha256": digest, "settings": _settings(fmt)}
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == digest:
        return path
    if failed.is_file():
        try:
            seen = json.loads(failed.read_text())
        except (OSError, ValueError):
            seen = {}
        if isinstance(seen, dict) and {k: seen.get(k) for k in key} == key:
            raise ExportError(f"{seen.get('error', 'export failed')} (recorded in {failed}; "
                              "not retried until the weights or the runtime change)",
                              recorded=True)
    log.info("exporting %s to %s (once per weights)", weights, fmt)
    try:
        export(weights, fmt, folder)
    except ExportError as e:
        failed.write_text(json.dumps({**key, "error": str(e)}, indent=2) + "\n")
        raise
    failed.unlink(missing_ok=True)  # our own record, superseded by the export that worked
    stamp.write_text(digest + "\n")
    return path


def _torch_backend(weights: Path, precision: str) -> Backend:
    model = load_model(weights)
    folded = fold_batchnorm(model).to(memory_format=torch.channels_last)
    bf16 = precision == "bf16"

    @torch.inference_mode()
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return folded(x.contiguous(memory_format=torch.channels_last)).float()

    return Backend("torch", run, model.model_config, folded, precision)


def int8_graph(weights: Path) -> Path:
    """The calibrated int8 graph; calibration needs training data, so export makes it."""
    path = export_dir(weights) / INT8_FILE
    if not path.is_file():
        raise ConfigError(f"no int8 graph for {weights}: run `resnetlab export RUN_DIR "
                          "--format onnx-int8` first (it calibrates on training images)")
    return path


def _ort_backend(weights: Path, config: ModelConfig, threads: int, precision: str) -> Backend:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    path = int8_graph(weights) if precision == "int8" else exported(weights, "onnx")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run(None, {INPUT: arr})[0])

    return Backend("onnxruntime", run, config, precision=precision)


def _openvino_backend(weights: Path, config: ModelConfig, threads: int, precision: str
                      ) -> Backend:
    extra: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        extra["INFERENCE_NUM_THREADS"] = threads
    # int8: OpenVINO reads the QDQ graph and runs its int8 layers as such
    path = int8_graph(weights) if precision == "int8" else exported(weights, "openvino")
    props = openvino_props(precision, **extra)
    try:
        infer = OpenVINORunner(path, props)
    except RuntimeError as e:  # e.g. under ONEDNN_MAX_CPU_ISA, which its plugin cannot honour
        said = [ln for ln in str(e).splitlines()
                if ln.strip() and not ln.startswith(("Exception from", "Check '"))]
        raise ExportError(f"openvino could not compile {path.name} at {precision}: "
                          f"{said[-1] if said else e}") from e

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(infer(np.ascontiguousarray(x.detach().cpu().numpy(),
                                                           dtype=np.float32)))

    return Backend("openvino", run, config, precision=precision)


def _build(name: str, wdir: Path, config: ModelConfig, threads: int, precision: str
           ) -> Backend:
    if name == "torch":
        return _torch_backend(wdir, precision)
    if name == "onnxruntime":
        return _ort_backend(wdir, config, threads, precision)
    return _openvino_backend(wdir, config, threads, precision)


def check_precision(weights: str | os.PathLike[str], backend: str, precision: str,
                    images: Iterable[torch.Tensor], min_agreement: float = MIN_AGREEMENT,
                    threads: int = 0, reuse: bool = False) -> Agreement:
    """Run `backend` at `precision` and the fp32 PyTorch model over `images`; record and
    return their top-1 agreement (agreement.py). `reuse`: a record for these weights is
    returned as it is."""
    wdir = Path(weights)
    if reuse:
        found = lookup(export_dir(wdir), backend, precision, _digest(wdir / WEIGHTS_FILE),
                       min_agreement)
        if found is not None:
            return found
    config = ModelConfig.from_json(wdir / CONFIG_FILE)
    be = _build(backend, wdir, config, threads, precision)
    log.info("checking %s %s against fp32 on the run's test images (once per weights)",
             backend, precision)
    frac, n, worst = agreement.measure(be, load_model(wdir).eval(), images)
    result = Agreement(backend, precision, _digest(wdir / WEIGHTS_FILE), frac, n,
                       min_agreement, worst)
    agreement.record(export_dir(wdir), result)
    return result


def _precisions(wdir: Path, name: str, requested: str, check: ImageSource | None,
                min_agreement: float) -> list[str]:
    """The precisions to try for backend `name`, in order. `auto`: the fastest native ones
    whose agreement check passes (run now if `check` gives images and none is recorded),
    then fp32. An explicit reduced precision whose recorded check failed is refused."""
    digest = _digest(wdir / WEIGHTS_FILE)
    folder = export_dir(wdir)
    if requested != "auto":
        found = None if requested == "fp32" else lookup(folder, name, requested, digest,
                                                        min_agreement)
        if found is not None and not found.passed:
            raise ConfigError(f"{found.line()}: use --precision fp32, or accept it with a "
                              "lower --min-agreement")
        return [requested]
    out = []
    for prec in infer_candidates(name):
        if prec == "fp32" or (prec == "int8" and not (folder / INT8_FILE).is_file()):
            continue
        found = lookup(folder, name, prec, digest, min_agreement)
        if found is None and check is not None:
            found = check_precision(wdir, name, prec, check(), min_agreement)
        if found is None:
            log.info("%s %s is not checked for %s yet (`resnetlab eval RUN --backend %s "
                     "--precision %s` checks it); using a slower precision", name, prec,
                     wdir, name, prec)
        elif found.passed:
            out.append(prec)
        else:
            log.info("not using %s", found.line())
    return [*out, "fp32"]


def load_backend(weights: str | os.PathLike[str], backend: str = "auto", threads: int = 0,
                 precision: str = "fp32", check: ImageSource | None = None,
                 min_agreement: float = MIN_AGREEMENT) -> Backend:
    """The model in the weights directory `weights`, on `backend` (see BACKENDS) at
    `precision` (fp32, bf16, int8, or auto: the fastest this CPU runs natively whose
    top-1 agreement with fp32 passes `min_agreement`; `check` gives the images to check
    it on when no check is recorded yet)."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in INFER_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(INFER_PRECISIONS)}, "
                          f"got {precision!r}")
    if backend == "onnxruntime-int8":  # the older spelling of onnxruntime at int8
        backend, precision = "onnxruntime", "int8"
    wdir = Path(weights)
    config = ModelConfig.from_json(wdir / CONFIG_FILE)  # not weights: say so before exporting
    names = [n for n in PREFERENCE if available(n)] if backend == "auto" else [backend]
    if not available(names[0]):
        raise ConfigError(f"backend {backend} is not installed: pip install 'resnetlab[deploy]'")
    if precision != "auto":
        fit = [n for n in names if precision in supported(n)]
        if not fit:
            runs = {n: supported(n) for n in PREFERENCE}
            raise ConfigError(f"{backend} does not run {precision}; " + "; ".join(
                f"{n} runs {', '.join(p)}" for n, p in runs.items()))
        names = fit
    for name in names:
        try:
            for prec in _precisions(wdir, name, precision, check, min_agreement):
                return _build(name, wdir, config, threads, prec)
        except ExportError as e:
            if backend != "auto":
                raise
            (log.debug if e.recorded else log.warning)(
                "backend %s unavailable for %s (%s); trying the next", name, wdir, e)
    raise AssertionError("unreachable: the torch backend always loads")
