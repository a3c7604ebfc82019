"""int8 post-training quantisation with ONNX Runtime, calibrated on training images.

Static quantisation (QDQ format): weights per output channel in int8, activations in
uint8 with ranges from running the fp32 graph over the calibration images (min-max).
The result is not held to the fp32 tolerance; instead the top-1 agreement with the fp32
model on the calibration images must reach `min_agreement` (agreement.py's
MIN_CALIBRATION_AGREEMENT: a floor against a broken calibration), and `resnetlab eval
--precision int8` checks it against MIN_AGREEMENT on the test images and reports the
accuracy it actually has.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..runs import run_data, weights_dir
from .agreement import MIN_CALIBRATION_AGREEMENT
from .backends import export_folder, exported
from .export import run_exported
from .runtimes import INPUT, INT8_FILE, RUNTIMES, ExportError


def int8_path(weights: Path) -> Path:
    return export_folder(weights) / INT8_FILE


def quantize_int8(weights: str | Path, calibration: Iterable[torch.Tensor], images: int = 512,
                  min_agreement: float = MIN_CALIBRATION_AGREEMENT) -> tuple[Path, float]:
    """Write `<export>/model.int8.onnx`; returns (path, top-1 agreement with fp32)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    wdir = Path(weights)
    batches, n = [], 0
    for batch in calibration:
        batches.append(np.ascontiguousarray(batch.numpy(), dtype=np.float32))
        n += len(batch)
        if n >= images:
            break
    if not batches:
        raise ConfigError("int8 calibration needs training images; none were found")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {INPUT: x}

    fp32 = exported(wdir, RUNTIMES["onnxruntime"])
    out = int8_path(wdir)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prepared, staged = Path(tmp) / "prepared.onnx", Path(tmp) / INT8_FILE
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(staged), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        x = np.concatenate(batches)
        agree = float((run_exported(staged, "onnx", x).argmax(1) ==
                       run_exported(fp32, "onnx", x).argmax(1)).mean())
        if agree < min_agreement:
            raise ExportError(f"int8 top-1 agrees with fp32 on only {100 * agree:.1f}% of the "
                              f"{len(x)} calibration images (< {100 * min_agreement:.0f}%); "
                              "nothing was written")
        staged.replace(out)
    return out, agree  # the caller reports them (`resnetlab export` prints both)


def quantize_run(weights: str | os.PathLike[str], images: int = 512,
                 min_agreement: float = MIN_CALIBRATION_AGREEMENT, dataset: str | None = None,
                 data_dir: str | None = None) -> tuple[Path, float]:
    """`quantize_int8` of a run's weights (or a weights directory), calibrated on the
    un-augmented training images of its data set (`dataset` outside a run)."""
    data = run_data(weights, 128, dataset, data_dir)
    return quantize_int8(weights_dir(weights), (x for x, _ in data.train_eval.batches(0)),
                         images, min_agreement)
