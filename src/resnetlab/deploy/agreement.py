"""The check a reduced precision must pass before it is used: top-1 agreement with fp32.

A bf16 or int8 backend is run over real images (the run's own test images) beside the
PyTorch fp32 model; the fraction of images on which both pick the same class is recorded
in `<export>/agreement.json`, keyed by backend/precision and the weights' digest, so it is
measured once per weights. A reduced precision, chosen by `auto` or asked for, is used only
if its record passes (deploy/backends.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..files import write_atomic

RECORD = "agreement.json"
# Two bars, on two sets of images. MIN_AGREEMENT is the one a reduced precision (bf16 or
# int8) must pass on the run's test images before eval, predict, serve or auto use it.
# MIN_CALIBRATION_AGREEMENT is export's floor for writing the int8 graph at all, measured on
# the training images it was calibrated on: it only catches a broken calibration, and is
# lower so that a graph near the line is written and then judged on the test images by
# MIN_AGREEMENT, where it counts. Both are configurable per call (--min-agreement).
MIN_AGREEMENT = 0.995
MIN_CALIBRATION_AGREEMENT = 0.95


@dataclass
class Agreement:
    backend: str
    precision: str
    weights_sha256: str
    agreement: float  # fraction of images with the same top-1 as fp32
    images: int
    min_agreement: float
    max_abs_diff: float  # largest |logit difference| seen, for the record

    @property
    def passed(self) -> bool:
        return self.agreement >= self.min_agreement

    def line(self) -> str:
        verdict = "passes" if self.passed else "FAILS"
        return (f"{self.backend} {self.precision}: top-1 agrees with fp32 on "
                f"{100 * self.agreement:.2f}% of {self.images:,} images ({verdict} the "
                f"{100 * self.min_agreement:.1f}% bar; max |logit diff| "
                f"{self.max_abs_diff:.2e})")


def _read(folder: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lookup(folder: Path, backend: str, precision: str, digest: str,
           min_agreement: float) -> Agreement | None:
    """The recorded check for these weights, judged against `min_agreement`; None if none."""
    rec = _read(folder).get(f"{backend}/{precision}")
    if not isinstance(rec, dict) or rec.get("weights_sha256") != digest:
        return None
    try:
        found = Agreement(**{**rec, "min_agreement": min_agreement})  # type: ignore[arg-type]
    except TypeError:
        return None
    return found


def measure(run: Callable[[torch.Tensor], torch.Tensor], reference: nn.Module,
            images: Iterable[torch.Tensor]) -> tuple[float, int, float]:
    """(top-1 agreement, images, max |logit diff|) of `run` against `reference`."""
    same = total = 0
    worst = 0.0
    with torch.inference_mode():
        for x in images:
            got, ref = run(x).float(), reference(x).float()
            same += int((got.argmax(1) == ref.argmax(1)).sum())
            total += len(x)
            worst = max(worst, float((got - ref).abs().max()))
    return same / max(total, 1), total, worst


def record(folder: Path, result: Agreement) -> None:
    data = _read(folder)
    entry = asdict(result)
    entry.pop("min_agreement")  # judged afresh against each caller's bar
    data[f"{result.backend}/{result.precision}"] = entry
    # Not logged here: `eval` prints the line with its results (logging it too printed it
    # twice), and a check that fails is reported by whoever refuses the precision.
    write_atomic(folder / RECORD, lambda tmp: Path(tmp).write_text(
        json.dumps(data, indent=2) + "\n"))
