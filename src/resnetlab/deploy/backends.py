"""Inference backends behind one interface: `load_backend(weights, "auto")(images) -> logits`.

A backend is a runtime of deploy/runtimes.py at a stated precision (resnetlab.precision):
fp32, or a reduced one the runtime offers (bf16; int8, the graph that `resnetlab export
--format onnx-int8` calibrates, deploy/quantize.py), or auto: the fastest the CPU runs
natively whose top-1 agreement with fp32 passes its check (deploy/agreement.py). Graph
runtimes run the graph exported on first use into the weights' export folder (or a user
cache when the weights folder is read-only), re-exported when the weights change.
A backend is an nn.Module, so `evaluate` scores it as is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, ResNetLabError
from ..files import cache_dir
from ..models.config import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from ..models.factory import load_model
from ..precision import INFER_PRECISIONS, infer_candidates
from ..runs import RunDir, export_dir
from . import agreement
from .agreement import MIN_AGREEMENT, Agreement, lookup
from .export import digest, export, stamp_path
from .runtimes import INT8_FILE, RUNTIMES, ExportError, Runtime, TorchRunner, served

log = logging.getLogger(__name__)
ImageSource = Callable[[], Iterable[torch.Tensor]]  # batches of preprocessed test images
INT8_ALIAS = "onnxruntime-int8"  # the older spelling of onnxruntime at int8, still accepted


def backend_names() -> list[str]:
    """What `--backend` accepts: auto, each served runtime, and INT8_ALIAS."""
    return ["auto", *(r.name for r in RUNTIMES.values() if r.auto_rank is not None),
            INT8_ALIAS]


def canonical(backend: str, precision: str) -> tuple[str, str]:
    """(backend, precision) in the one spelling everything after it sees: INT8_ALIAS is
    onnxruntime at int8, so both spellings take one path and one agreement rule."""
    if backend != INT8_ALIAS:
        return backend, precision
    if precision not in ("auto", "int8"):
        raise ConfigError(f"--backend {INT8_ALIAS} is --backend onnxruntime --precision int8; "
                          f"for {precision} use --backend onnxruntime --precision {precision}")
    return "onnxruntime", "int8"


class Backend(nn.Module):
    """Logits (float32) for a float32 NCHW batch, by the runtime `name` at `precision`.
    `agreement`: the check that let a reduced precision be used (None for fp32, or when
    no images were given to check it), so callers report it without measuring again."""

    def __init__(self, runtime: Runtime, weights: Path, precision: str, threads: int = 0,
                 agreement: Agreement | None = None) -> None:
        super().__init__()
        self.name, self.precision, self.agreement = runtime.name, precision, agreement
        self.model_config = ModelConfig.from_json(weights / CONFIG_FILE)
        if runtime.open is None:  # PyTorch itself (its parameters are visible here)
            self.module: nn.Module | None = TorchRunner(weights, precision)
            self.graph: Callable[[np.ndarray], np.ndarray] | None = None
        else:
            path = int8_graph(weights) if precision == "int8" else \
                exported(weights, runtime)
            self.module, self.graph = None, runtime.open(path, precision, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.module is not None:
            return self.module(x)
        assert self.graph is not None
        arr = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.graph(arr))


def export_folder(weights: Path) -> Path:
    """The weights' export folder, or a per-weights cache folder if that cannot be written
    or the weights are an unfinished run's checkpoint: `predict` or `serve` on a run under
    way must leave nothing in it (a checkpoint holding others' files is never pruned)."""
    own, run = export_dir(weights), RunDir.around(weights)
    if run is None or Path(weights).parent != run.checkpoints:
        try:
            own.mkdir(exist_ok=True)
            if os.access(own, os.W_OK):
                return own
        except OSError:
            pass
    return cache_dir() / "export" / digest(weights / WEIGHTS_FILE)[:16]


def exported(weights: Path, runtime: Runtime) -> Path:
    """The runtime's graph of these weights, exported (and parity-checked) if missing or
    stale. A failed export is recorded (`<format>.failed`) and not retried until the weights
    or the runtime's version change: `auto` would otherwise redo a doomed export each call."""
    assert runtime.format is not None
    fmt, folder = runtime.format, export_folder(weights)
    path, stamp, failed = (folder / runtime.files[0], stamp_path(folder, fmt),
                           folder / f"{fmt}.failed")
    source = digest(weights / WEIGHTS_FILE)
    key = {"weights_sha256": source, "settings": runtime.settings()}
    if path.is_file() and stamp.is_file() and stamp.read_text().strip() == source:
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
    log.info("exporting %s to %s in %s (once per weights)", weights, fmt, folder)
    try:
        export(weights, fmt, folder, replace=True)  # its own folder, or its cache
    except ExportError as e:
        failed.write_text(json.dumps({**key, "error": str(e)}, indent=2) + "\n")
        raise
    failed.unlink(missing_ok=True)  # our own record, superseded by the export that worked
    return path


def int8_graph(weights: Path) -> Path:
    """The calibrated int8 graph; calibration needs training data, so export makes it."""
    path = export_folder(weights) / INT8_FILE
    if not path.is_file():
        raise ConfigError(f"no int8 graph for {weights}: run `resnetlab export RUN_DIR "
                          "--format onnx-int8` first (it calibrates on training images)")
    return path


def check_precision(weights: str | os.PathLike[str], backend: str, precision: str,
                    images: Iterable[torch.Tensor], min_agreement: float = MIN_AGREEMENT,
                    threads: int = 0) -> Agreement:
    """Run `backend` at `precision` and the fp32 PyTorch model over `images`; record and
    return their top-1 agreement (agreement.py)."""
    wdir = Path(weights)
    be = Backend(RUNTIMES[backend], wdir, precision, threads)
    log.info("checking %s %s against fp32 on the run's test images (once per weights)",
             backend, precision)
    frac, n, worst = agreement.measure(be, load_model(wdir).eval(), images)
    result = Agreement(backend, precision, digest(wdir / WEIGHTS_FILE), frac, n,
                       min_agreement, worst)
    agreement.record(export_folder(wdir), result)
    return result


def _check(wdir: Path, name: str, precision: str, check: ImageSource,
           min_agreement: float) -> Agreement | None:
    """The check of `precision` on the images `check` gives; None (unchecked, as weights
    outside a run are) where the run's data cannot be read: moved, or changed since."""
    try:
        images = check()
    except ResNetLabError as e:
        log.warning("%s %s cannot be checked on the run's test images: %s", name, precision, e)
        return None
    return check_precision(wdir, name, precision, images, min_agreement)


def _precisions(wdir: Path, runtime: Runtime, requested: str, check: ImageSource | None,
                min_agreement: float) -> list[tuple[str, Agreement | None]]:
    """The precisions to try for `runtime`, in order, each with the check that admits it.
    A reduced precision is checked (once
    per weights, now if `check` gives images and none is recorded) before it is used:
    `auto` takes the fastest native ones whose check passes, then fp32; an explicit one
    whose check fails is refused."""
    name, source, folder = runtime.name, digest(wdir / WEIGHTS_FILE), export_folder(wdir)
    if requested == "fp32":
        return [(requested, None)]
    if requested != "auto":
        found = lookup(folder, name, requested, source, min_agreement)
        if found is None and check is not None:
            found = _check(wdir, name, requested, check, min_agreement)
        if found is None:  # no images given (weights outside a run, a benchmark)
            log.debug("%s %s runs unchecked for %s", name, requested, wdir)
        elif not found.passed:
            raise ConfigError(f"{found.line()}: use --precision fp32, or accept it with a "
                              "lower --min-agreement")
        return [(requested, found)]
    out: list[tuple[str, Agreement | None]] = []
    for prec in infer_candidates(runtime.precisions):
        if prec == "fp32" or (prec == "int8" and not (folder / INT8_FILE).is_file()):
            continue
        found = lookup(folder, name, prec, source, min_agreement)
        if found is None and check is not None:
            found = _check(wdir, name, prec, check, min_agreement)
        if found is None:
            log.info("%s %s is not checked for %s yet (`resnetlab eval RUN --backend %s "
                     "--precision %s` checks it); using a slower precision", name, prec,
                     wdir, name, prec)
        elif found.passed:
            out.append((prec, found))
        else:
            log.info("not using %s", found.line())
    return [*out, ("fp32", None)]


def load_backend(weights: str | os.PathLike[str], backend: str = "auto", threads: int = 0,
                 precision: str = "fp32", check: ImageSource | None = None,
                 min_agreement: float = MIN_AGREEMENT) -> Backend:
    """The model in the weights directory `weights`, on `backend` (backend_names()) at
    `precision` (fp32, bf16, int8, or auto: the fastest this CPU runs natively whose
    top-1 agreement with fp32 passes `min_agreement`). A reduced precision, asked for or
    chosen by auto, is checked on the images `check` gives when no check is recorded yet,
    and not used if it fails."""
    if backend not in backend_names():
        raise ConfigError(f"backend must be one of {', '.join(backend_names())}, "
                          f"got {backend!r}")
    if precision not in INFER_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(INFER_PRECISIONS)}, "
                          f"got {precision!r}")
    backend, precision = canonical(backend, precision)
    wdir = Path(weights)
    ModelConfig.from_json(wdir / CONFIG_FILE)  # not weights: say so before exporting
    runtimes = [r for r in served() if r.available()] if backend == "auto" \
        else [RUNTIMES[backend]]
    if not runtimes[0].available():
        raise ConfigError(f"backend {backend} is not installed: pip install 'resnetlab[deploy]'")
    if precision != "auto":
        fit = [r for r in runtimes if precision in r.precisions]
        if not fit:
            raise ConfigError(f"{backend} does not run {precision}; " + "; ".join(
                f"{r.name} runs {', '.join(r.precisions)}" for r in served()))
        runtimes = fit
    for runtime in runtimes:
        try:
            for prec, admitted in _precisions(wdir, runtime, precision, check,
                                              min_agreement):
                return Backend(runtime, wdir, prec, threads, admitted)
        except ExportError as e:
            if backend != "auto":
                raise
            (log.debug if e.recorded else log.warning)(
                "backend %s unavailable for %s (%s); trying the next", runtime.name, wdir, e)
    raise AssertionError("unreachable: the torch backend always loads")
