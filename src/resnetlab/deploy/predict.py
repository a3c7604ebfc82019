"""Class predictions for image files, with the preprocessing the weights were trained with."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF

from ..data.images import ImageError, load_image
from ..data.memory import Normalize
from ..runs import weights_dir
from .agreement import MIN_AGREEMENT
from .backends import ImageSource, load_backend


@dataclass
class Prediction:
    path: str
    labels: list[str]
    probs: list[float]
    indices: list[int]


class Predictor:
    """Top-k classes of image files; `backend`: one of deploy.backends.backend_names()."""

    def __init__(self, weights: str | os.PathLike[str], backend: str = "torch",
                 precision: str = "fp32", check: ImageSource | None = None,
                 min_agreement: float = MIN_AGREEMENT) -> None:
        self.model = load_backend(weights_dir(weights), backend, precision=precision,
                                  check=check, min_agreement=min_agreement).eval()
        cfg = self.model.model_config
        self.size, self.in_chans = cfg.input_size, cfg.in_chans
        self.crop_pct = cfg.resolved_crop_pct
        self.interpolation = TF.InterpolationMode(cfg.interpolation)
        self.normalize = Normalize(cfg.mean, cfg.std)
        self.classes = cfg.class_names or [str(i) for i in range(cfg.num_classes)]

    def preprocess(self, path: str | os.PathLike[str] | bytes, name: str = "upload"
                   ) -> torch.Tensor:
        """Decode (a file, or an upload's bytes called `name` in errors), convert to the
        model's channels, resize and crop to its input size."""
        im = load_image(path, "L" if self.in_chans == 1 else "RGB", name)
        x = TF.pil_to_tensor(im)
        if self.in_chans not in (1, 3):
            x = x[:1].expand(self.in_chans, -1, -1)
        # The model's own crop (ModelConfig.crop_pct): small-image models see the whole
        # image; 224 models the paper's 256-resize centre crop unless their weights say else.
        short = round(self.size / self.crop_pct)
        x = TF.center_crop(TF.resize(x, [short], self.interpolation, antialias=True),
                           [self.size, self.size])
        return self.normalize(x.unsqueeze(0))

    def predict(self, paths: list[str], topk: int = 5) -> list[Prediction | ImageError]:
        """One result per path, in order: a Prediction, or the ImageError that file raised."""
        results: list[Prediction | ImageError] = []
        k = max(1, min(topk, len(self.classes)))
        with torch.inference_mode():
            for path in paths:
                try:
                    x = self.preprocess(path)
                except ImageError as e:
                    results.append(e)
                    continue
                probs = self.model(x).softmax(1)[0]
                top = probs.topk(k)
                idx = top.indices.tolist()
                results.append(Prediction(str(path), [self.classes[i] for i in idx],
                                          top.values.tolist(), idx))
        return results
