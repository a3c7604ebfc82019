"""`resnetlab export`: one weights directory as the graph of a runtime (deploy/runtimes.py).

Every format is written from the BN-folded model with a dynamic batch (and, for ONNX and
OpenVINO, dynamic height and width, so multi-scale testing runs on the exported graph), and
checked against PyTorch before success is reported: the same random batch through both,
maximum absolute logit difference under `tolerance` and identical top-1. OpenVINO IR is
converted from the ONNX graph, so ONNX Runtime and OpenVINO run the same graph.

Beside the graph, `<format>.source.sha256` names the weights it was exported from, if it
passed the backends' own bar (TOLERANCE): they use a graph only if it names their weights.
A graph in a folder the user named is replaced only if so recorded for the same weights.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models.config import WEIGHTS_FILE
from ..models.factory import load_model
from ..models.resnet import ResNet
from ..runs import export_dir
from .fold import fold_batchnorm
from .runtimes import ExportError, by_format


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    top1_agree: bool
    seconds: float


STAMP = "source.sha256"
TOLERANCE = 1e-3  # |logit difference| from PyTorch a graph the backends use may have


def digest(path: Path) -> str:
    """The SHA-256 of a file (a weights file: what a graph was exported from)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp_path(folder: Path, fmt: str) -> Path:
    return folder / f"{fmt}.{STAMP}"


def _sample(model: ResNet, batch: int = 3, seed: int = 0) -> torch.Tensor:
    cfg = model.model_config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.input_size, cfg.input_size, generator=gen)


def run_exported(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """Logits of the exported file at `path` for the float32 batch `x`, by its own runtime."""
    runtime = by_format(fmt)
    assert runtime.open is not None  # every format has a runtime that opens it
    return runtime.open(path, "fp32", 0)(x)


def export(weights: str | Path, fmt: str, out: str | Path | None = None,
           tolerance: float = TOLERANCE, replace: bool = False) -> ExportResult:
    """Export the model in `weights` as `fmt` into the folder `out` (default: beside it,
    its own, where an earlier graph is superseded; elsewhere only with `replace` or where
    the earlier graph was exported from these same weights)."""
    runtime = by_format(fmt)
    assert runtime.write is not None
    runtime.require()
    t0 = time.perf_counter()
    model = load_model(weights).eval()
    folded = fold_batchnorm(model)
    folder = Path(out) if out is not None else export_dir(weights)
    source = digest(Path(weights) / WEIGHTS_FILE)
    stamp = stamp_path(folder, fmt)
    path = folder / runtime.files[0]
    if (path.exists() and not replace and folder.resolve() != export_dir(weights).resolve()
            and not (stamp.is_file() and stamp.read_text().strip() == source)):
        raise ConfigError(f"{path} exists, and nothing there records that it was exported "
                          f"from {weights}; remove it or choose another --out")
    folder.mkdir(parents=True, exist_ok=True)
    example = _sample(model)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        staged = Path(tmp) / runtime.files[0]
        try:
            runtime.write(folded, example, Path(tmp))
        except Exception as e:  # the exporters raise many kinds; report one line
            raise ExportError(f"{fmt} export of {weights} failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                              ) from e
        # Parity on a batch size the trace did not see (the batch is dynamic).
        x = _sample(model, batch=5, seed=1)
        with torch.inference_mode():
            ref = model(x).numpy()
        got = run_exported(staged, fmt, x.numpy())
        diff = float(np.abs(got - ref).max())
        agree = bool((got.argmax(1) == ref.argmax(1)).all())
        if not (diff < tolerance and agree):
            raise ExportError(f"the {fmt} graph disagrees with PyTorch (max |logit diff| "
                              f"{diff:.2e}, top-1 {'equal' if agree else 'differs'}); "
                              "nothing was written")
        stamp.unlink(missing_ok=True)  # names the old graph until the new one is in place
        for f in Path(tmp).iterdir():  # ONNX may add model.onnx.data beside big graphs
            if f.name.startswith(runtime.files):
                shutil.move(str(f), folder / f.name)
        if diff < TOLERANCE:  # else the backends export again, to their own bar
            stamp.write_text(source + "\n")
    return ExportResult(path, fmt, diff, agree, time.perf_counter() - t0)
