"""The inference runtimes, one registry entry each: what a runtime needs, the precisions it
runs, the graph files it exports, how it writes them and how it runs them.

Adding a runtime is one `Runtime` in RUNTIMES: `export`, the backends, `auto` and the CLI
choices read it. `auto` tries the available runtimes by `auto_rank` (their speed order in
docs/performance.md). Graph runtimes load the BN-folded model exported into the weights'
export folder (deploy/backends.py), or, at int8, the calibrated graph INT8_FILE.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ResNetLabError
from ..models.factory import load_model
from ..precision import this_cpu
from .fold import fold_batchnorm

INPUT, OUTPUT = "images", "logits"
INT8_FILE = "model.int8.onnx"  # deploy/quantize.py writes it; onnxruntime and openvino run it

Runner = Callable[[np.ndarray], np.ndarray]  # float32 NCHW batch -> logits


class ExportError(ResNetLabError):
    """An export that failed or whose graph disagrees with PyTorch. `recorded`: this is the
    failure remembered from an earlier try with the same weights and settings."""

    def __init__(self, message: str, recorded: bool = False) -> None:
        super().__init__(message)
        self.recorded = recorded


@dataclass(frozen=True)
class Runtime:
    """One inference runtime. `format` and `files` are None/empty for PyTorch itself, which
    runs the model without exporting it; `open` runs a graph file at a precision with a
    number of threads (0: the runtime's default)."""

    name: str
    needs: tuple[str, ...]  # Python modules ("pip install 'resnetlab[deploy]'")
    precisions: tuple[str, ...]  # what it runs at all
    format: str | None = None  # `resnetlab export --format` name
    files: tuple[str, ...] = ()  # what its export keeps, main graph first
    write: Callable[[nn.Module, torch.Tensor, Path], None] | None = None  # into a folder
    open: Callable[[Path, str, int], Runner] | None = None
    auto_rank: int | None = None  # place in `auto`'s order, fastest first; None: not served
    version_of: str = "torch"  # the package whose version decides an export's outcome

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.needs)

    def require(self) -> None:
        missing = [m for m in self.needs if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"{self.format or self.name} export needs {', '.join(missing)}: "
                              "pip install 'resnetlab[deploy]'")

    def settings(self) -> str:
        """What besides the weights decides an export's outcome: the runtime's version."""
        return f"{self.version_of} {importlib.metadata.version(self.version_of)}"


def write_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX with a dynamic batch, height and width (multi-scale testing runs on it)."""
    batch, height, width = (torch.export.Dim(n, min=1, max=4096) for n in
                            ("batch", "height", "width"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(model, (example,), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], dynamo=True, verbose=False, external_data=False,
                          dynamic_shapes={"x": {0: batch, 2: height, 3: width}})


def _write_openvino(model: nn.Module, example: torch.Tensor, folder: Path) -> None:
    import openvino as ov

    onnx_path = folder / "model.onnx"
    write_onnx(model, example, onnx_path)
    # fp32 weights: save_model would halve them to fp16 by default (error ~1e-3)
    ov.save_model(ov.convert_model(str(onnx_path)), str(folder / "model.xml"),
                  compress_to_fp16=False)


def _write_torchscript(model: nn.Module, example: torch.Tensor, folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.14 deprecates TorchScript
        torch.jit.save(torch.jit.trace(model, example), str(folder / "model.torchscript"))


def ort_session(path: Path, threads: int = 0, profile: Path | None = None) -> Any:
    """The one way resnetlab opens an ONNX Runtime session: CPU, all graph optimisations;
    `profile`: record per-node times into files with this prefix (end_profiling())."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _open_ort(path: Path, precision: str, threads: int) -> Runner:
    session = ort_session(path, threads)  # int8 is in the graph itself (QDQ)
    return lambda x: session.run(None, {INPUT: x})[0]


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
    """

    def __init__(self, path: Path, props: dict[str, Any] | None = None) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.compiled = self.core.compile_model(str(path), "CPU", props or openvino_props())
        self.request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.array(self.request.infer({0: x})[0], copy=True)


def _open_openvino(path: Path, precision: str, threads: int) -> Runner:
    extra: dict[str, object] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        extra["INFERENCE_NUM_THREADS"] = threads
    try:
        return OpenVINORunner(path, openvino_props(precision, **extra))
    except RuntimeError as e:  # e.g. under ONEDNN_MAX_CPU_ISA, which its plugin cannot honour
        said = [ln for ln in str(e).splitlines()
                if ln.strip() and not ln.startswith(("Exception from", "Check '"))]
        raise ExportError(f"openvino could not compile {path.name} at {precision}: "
                          f"{said[-1] if said else e}") from e


def _open_torchscript(path: Path, precision: str, threads: int) -> Runner:
    def run(x: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.14 deprecates TorchScript
            return module(torch.from_numpy(x)).detach().numpy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path))
    return run


class TorchRunner(nn.Module):
    """The PyTorch backend: the BN-folded model, channels_last, inference mode, and bf16
    autocast when asked for."""

    def __init__(self, weights: Path, precision: str) -> None:
        super().__init__()
        self.model = fold_batchnorm(load_model(weights)).to(memory_format=torch.channels_last)
        self.bf16 = precision == "bf16"

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x.contiguous(memory_format=torch.channels_last)).float()


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (
    Runtime("torch", (), ("fp32", "bf16"), auto_rank=2),
    Runtime("onnxruntime", ("onnx", "onnxscript", "onnxruntime"), ("fp32", "int8"),
            format="onnx", files=("model.onnx",), write=lambda m, x, d: write_onnx(
                m, x, d / "model.onnx"), open=_open_ort, auto_rank=1,
            version_of="onnxruntime"),
    Runtime("openvino", ("onnx", "onnxscript", "openvino"), ("fp32", "bf16", "int8"),
            format="openvino", files=("model.xml", "model.bin"), write=_write_openvino,
            open=_open_openvino, auto_rank=0, version_of="openvino"),
    # Export only (a format people ask for; torch 2.14 deprecates it): no backend.
    Runtime("torchscript", (), ("fp32",), format="torchscript",
            files=("model.torchscript",), write=_write_torchscript, open=_open_torchscript),
)}


def formats() -> list[str]:
    """The export formats, as `resnetlab export --format` names them."""
    return [r.format for r in RUNTIMES.values() if r.format]


def served() -> list[Runtime]:
    """The runtimes a backend can run on, in `auto`'s order (fastest first)."""
    return sorted((r for r in RUNTIMES.values() if r.auto_rank is not None),
                  key=lambda r: r.auto_rank or 0)


def by_format(fmt: str) -> Runtime:
    found = [r for r in RUNTIMES.values() if r.format == fmt]
    if not found:
        raise ExportError(f"format must be one of {', '.join(formats())}, got {fmt!r}")
    return found[0]
