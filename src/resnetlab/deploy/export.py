"""`resnetlab export`: one weights directory to ONNX, OpenVINO IR or TorchScript.

Every format is written from the BN-folded model with a dynamic batch (and, for ONNX and
OpenVINO, dynamic height and width, so multi-scale testing runs on the exported graph), and
checked against PyTorch before success is reported: the same random batch through both,
maximum absolute logit difference under `tolerance` and identical top-1. OpenVINO IR is
converted from the ONNX graph, so ONNX Runtime and OpenVINO run the same graph.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ResNetLabError
from ..factory import load_model
from ..models.resnet import ResNet
from ..precision import this_cpu
from .fold import fold_batchnorm

log = logging.getLogger(__name__)

FORMATS = ("onnx", "openvino", "torchscript")
FILENAMES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript"}
INT8_FILE = "model.int8.onnx"  # deploy/quantize.py writes it; onnxruntime and openvino run it
INPUT, OUTPUT = "images", "logits"
_NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"),
          "openvino": ("onnx", "onnxscript", "openvino"), "torchscript": ()}


class ExportError(ResNetLabError):
    """An export that failed or whose graph disagrees with PyTorch. `recorded`: this is the
    failure remembered from an earlier try with the same weights and settings."""

    def __init__(self, message: str, recorded: bool = False) -> None:
        super().__init__(message)
        self.recorded = recorded


@dataclass
class ExportResult:
    path: Path
    format: str
    max_abs_diff: float
    top1_agree: bool
    seconds: float


def require(fmt: str) -> None:
    missing = [m for m in _NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"{fmt} export needs {', '.join(missing)}: "
                          "pip install 'resnetlab[deploy]'")


def _sample(model: ResNet, batch: int = 3, seed: int = 0) -> torch.Tensor:
    cfg = model.model_config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.input_size, cfg.input_size, generator=gen)


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    batch, height, width = (torch.export.Dim(n, min=1, max=4096) for n in
                            ("batch", "height", "width"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], dynamo=True, verbose=False, external_data=False,
                          dynamic_shapes={"x": {0: batch, 2: height, 3: width}})


# OpenVINO's CPU plugin computes in bf16 by default wherever the CPU has AVX512-BF16 or AMX
# (max |logit diff| 1.4e-3 to 2.6e-1 against PyTorch), so the precision is always stated.
OPENVINO_HINT = {"fp32": "f32", "bf16": "bf16"}


def openvino_props(precision: str = "fp32", **props: Any) -> dict[str, Any]:
    """Compile properties for OpenVINO's CPU plugin at `precision`. For an int8 graph the
    hint is that of its layers left in float: bf16 where the CPU runs it natively."""
    if precision == "int8":
        precision = "bf16" if this_cpu().native_bf16 else "fp32"
    return {"INFERENCE_PRECISION_HINT": OPENVINO_HINT[precision], **props}


class OpenVINORunner:
    """Logits of the OpenVINO IR (or ONNX graph) at `path` for a float32 batch, on the CPU.

    Holds the Core, the compiled model and the infer request together, so that no request
    outlives the objects it was made from (as `Core().compile_model(...)
    .create_infer_request()` lets it; OpenVINO's own tests crashed on such lifetimes).
    Outputs are copied out of the request's buffer, which the next call overwrites.
    `props` defaults to fp32 (openvino_props()).
    """

    def __init__(self, path: Path, props: dict[str, Any] | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.compiled = self.core.compile_model(str(path), "CPU", props or openvino_props())
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[0], copy=True)


def run_exported(path: Path, fmt: str, x: np.ndarray) -> np.ndarray:
    """Logits of the exported file at `path` for the float32 batch `x`, by its own runtime."""
    if fmt == "onnx":
        import onnxruntime as ort

        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {INPUT: x})[0]
    if fmt == "openvino":
        return OpenVINORunner(path)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
        return torch.jit.load(str(path))(torch.from_numpy(x)).detach().numpy()


def export(weights: str | Path, fmt: str, out: str | Path | None = None,
           tolerance: float = 1e-3) -> ExportResult:
    """Export the model in `weights` as `fmt` into the folder `out` (default: beside it)."""
    if fmt not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require(fmt)
    t0 = time.perf_counter()
    model = load_model(weights).eval()
    folded = fold_batchnorm(model)
    folder = Path(out) if out is not None else Path(weights) / "export"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILENAMES[fmt]
    example = _sample(model)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        staged = Path(tmp) / FILENAMES[fmt]
        try:
            if fmt == "torchscript":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.jit.save(torch.jit.trace(folded, example), str(staged))
            else:
                onnx_path = Path(tmp) / FILENAMES["onnx"]
                write_onnx(folded, example, onnx_path)
                if fmt == "openvino":
                    import openvino as ov

                    # fp32 weights: save_model would halve them to fp16 by default (error ~1e-3)
                    ov.save_model(ov.convert_model(str(onnx_path)), str(staged),
                                  compress_to_fp16=False)
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
        keep = ("model.xml", "model.bin") if fmt == "openvino" else (staged.name,)
        for f in Path(tmp).iterdir():  # ONNX may add model.onnx.data beside big graphs
            if f.name.startswith(keep):
                shutil.move(str(f), folder / f.name)
    log.info("%s: %s (max |logit diff| %.1e)", fmt, path, diff)
    return ExportResult(path, fmt, diff, agree, time.perf_counter() - t0)
