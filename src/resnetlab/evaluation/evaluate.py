"""Scoring a model the paper's ways: single view, 10-crop, multi-scale fully convolutional.

10-crop (paper sec. 3.4, from AlexNet): resize so the shorter side is 256/224 of the crop,
take the four corners and the centre, and their mirror images; average the softmax (a
folder's images arrive as those ten views, data.folder.view_transform). Small
images trained on random crops of a zero-padded image (sec. 4.2) are cropped the same way
instead: the padded image's corners and centre, the very views training saw (`PadCrop`);
upscaling a 28-32 px image and cropping it shows the net objects larger than it learned.
Multi-scale: the network is fully convolutional up to its global pool, so the whole image
is scored at several shorter sides ({224, 256, 384, 480, 640} for 224 models; the same
ratios of the native size for small images) and with flips; the softmax is averaged.
Flip: the image and its mirror, the cheapest view that training's flips make free (the
fast-training recipes' test-time augmentation, as airbench's).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..errors import ConfigError
from ..files import write_atomic

TTA_MODES = ("center", "flip", "10crop", "multiscale")
PAPER_SCALES = (224, 256, 384, 480, 640)


@dataclass(frozen=True)
class PadCrop:
    """How training cropped small images: `pad` zero pixels a side, before normalising with
    `mean` (per channel (C, 1, 1), or per pixel (C, H, W)) and `std`."""

    pad: int
    mean: torch.Tensor
    std: torch.Tensor

    def crops(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The corners and centre of the padded image, and their mirrors, normalised as the
        training crops were (a crop's pixel takes the statistics of its place in the crop)."""
        mean, std = self.mean.to(x), self.std.to(x)  # x may be on a GPU
        padded = F.pad(x * std + mean, [self.pad] * 4)
        return tuple((c - mean) / std for c in TF.ten_crop(padded, list(x.shape[-2:])))

    def flip(self, x: torch.Tensor) -> torch.Tensor:
        """The mirror image as training made it: of the pixels, before a per-pixel mean
        (normalize: pixel) is taken off; per channel, the same as flipping `x`."""
        mean, std = self.mean.to(x), self.std.to(x)
        return ((x * std + mean).flip(-1) - mean) / std


def ten_crop_probs(model: nn.Module, x: torch.Tensor,
                   pad_crop: PadCrop | None = None) -> torch.Tensor:
    """Mean softmax over the 10 crops of a batch: given as (N, 10, C, H, W) (a folder's,
    cut from the whole image), those of `pad_crop`, else square crops of the input's
    shorter side after upscaling that side by 256/224."""
    if x.dim() == 5:
        crops = x.unbind(1)
    elif pad_crop is not None:
        crops = pad_crop.crops(x)
    else:
        size = min(x.shape[-2:])
        big = TF.resize(x, [round(size * 256 / 224)], antialias=True)
        crops = TF.ten_crop(big, [size, size])
    return torch.stack([model(c.contiguous()).softmax(1) for c in crops]).mean(0)


def multiscale_probs(model: nn.Module, x: torch.Tensor,
                     scales: Iterable[float] | None = None) -> torch.Tensor:
    """Mean softmax over whole images resized to several scales, with their flips; a scale
    is the shorter side's new length over its length now."""
    size = min(x.shape[-2:])
    ratios = scales or [s / 224 for s in PAPER_SCALES]
    probs = []
    for r in ratios:
        xi = TF.resize(x, [round(size * r)], antialias=True)  # at r = 1: x itself
        probs += [model(xi).softmax(1), model(xi.flip(-1)).softmax(1)]
    return torch.stack(probs).mean(0)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (the CPU for a model that has none)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def predict_probs(model: nn.Module, x: torch.Tensor, tta: str = "center",
                  pad_crop: PadCrop | None = None) -> torch.Tensor:
    if tta == "center":
        return model(x).softmax(1)
    if tta == "flip":
        mirror = pad_crop.flip(x) if pad_crop is not None else x.flip(-1)
        return (model(x).softmax(1) + model(mirror).softmax(1)) / 2
    if tta == "10crop":
        return ten_crop_probs(model, x, pad_crop)
    if tta == "multiscale":
        return multiscale_probs(model, x)
    raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")


@dataclass
class EvalResult:
    top1_error: float
    top5_error: float
    loss: float
    count: int
    per_class_accuracy: list[float | None] = field(default_factory=list)  # None: no images
    confusion: list[list[int]] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {"top1_error": self.top1_error, "top5_error": self.top5_error,
                "loss": self.loss, "count": self.count}

    def report(self, classes: list[str], **context: object) -> dict[str, object]:
        """What eval reports hold: `context`, the summary, per-class accuracy, confusion."""
        return {**context, **self.summary(),
                "per_class_accuracy": dict(zip(classes, self.per_class_accuracy, strict=True)),
                "confusion": self.confusion}

    def save(self, path: Path, classes: list[str], **context: object) -> Path:
        """Write `report(classes, **context)` as JSON to `path`, atomically."""
        text = json.dumps(self.report(classes, **context), indent=2) + "\n"
        write_atomic(path, lambda tmp: Path(tmp).write_text(text))
        return path


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             num_classes: int, tta: str = "center",
             progress: Callable[[int], None] | None = None,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             pad_crop: PadCrop | None = None) -> EvalResult:
    """Top-1/top-5 error, mean NLL, per-class accuracy and the confusion matrix.

    `reduce` sums a tensor over data-parallel ranks that each scored their own shard, so
    the result is that of one process scoring the whole split.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # top-5 hits, summed NLL
    k = min(5, num_classes)
    with torch.inference_mode():
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            probs = predict_probs(model, x, tta, pad_crop).float()
            top = probs.topk(k, 1).indices  # top-1 is its first: ties broken once, alike
            sums[0] += (top == y[:, None]).any(1).sum()
            sums[1] += F.nll_loss(probs.clamp_min(1e-12).log(), y, reduction="sum")
            confusion += torch.bincount(y * num_classes + top[:, 0],
                                        minlength=num_classes ** 2).view(num_classes, -1)
            if progress:
                progress(len(y))
    model.train(was_training)
    if reduce is not None:
        confusion, sums = reduce(confusion), reduce(sums)
    confusion, sums = confusion.cpu(), sums.cpu()
    n = int(confusion.sum())
    if n == 0:
        raise ConfigError("evaluation got no examples: the split being scored holds no "
                          "images; check that the data set's files (--data-dir) hold some for it")
    correct = confusion.diag()
    # A class the split holds no image of has no accuracy (0% would read as all wrong).
    per_class = [c / t if t else None for c, t in zip(correct.tolist(),
                                                      confusion.sum(1).tolist(), strict=True)]
    return EvalResult(1 - correct.sum().item() / n, 1 - sums[0].item() / n, sums[1].item() / n,
                      n, per_class, confusion.tolist())


def recompute_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 max_batches: int = 200) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over training batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    device = model_device(model)
    seen = 0
    with torch.no_grad():
        for x, _ in batches:
            if seen >= max_batches:
                break
            model(x.to(device))
            seen += 1
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom
    model.train(was_training)
    if not seen:  # reset statistics (mean 0, variance 1) would score as if they were learned
        raise ConfigError("--recompute-bn got no training images to re-estimate BatchNorm on")
