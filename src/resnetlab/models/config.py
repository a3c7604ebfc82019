"""What `config.json` holds next to a model's weights: enough to rebuild it and feed it images."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import WeightsError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# 2 (2026-12-07): a pre-activation net's first unit splits after its BN-ReLU; weights of
# version 1 are rebuilt as they were trained (factory.create_model).
FORMAT_VERSION = 2


@dataclass
class ModelConfig:
    """What `config.json` holds next to the weights: enough to rebuild the model and to
    bring an image to it.

    Attributes:
        architecture: the registered name (`create_model`'s `name`).
        num_classes: classifier outputs (0: pooled features).
        in_chans: input channels.
        input_size: the side of the images the model was trained on.
        mean: mean subtracted from images in [0, 1]: one per channel, or a [C, H, W]
            image for runs trained with the paper's per-pixel mean.
        std: per-channel standard deviation images are divided by.
        overrides: `ResNet` arguments that differ from the registry's.
        class_names: a name per class, if known.
        format_version: the file format's version.
        crop_pct: how an image is brought to input_size: its shorter side resized to
            input_size / crop_pct, then centre-cropped; None: 1.0 below 64 px, else
            224/256 (paper sec. 3.4).
        interpolation: how images are resized.
    """

    architecture: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: list[float]
    std: list[float]
    overrides: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    format_version: int = FORMAT_VERSION
    crop_pct: float | None = None
    interpolation: str = "bilinear"

    @property
    def resolved_crop_pct(self) -> float:
        if self.crop_pct is not None:
            return self.crop_pct
        return 1.0 if self.input_size < 64 else 224 / 256

    @classmethod
    def from_json(cls, path: Path) -> ModelConfig:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls(**data)
        except (FileNotFoundError, NotADirectoryError):
            raise WeightsError(f"{path} is missing: {path.parent} is not a resnetlab weights "
                               "directory") from None
        except (json.JSONDecodeError, TypeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path} is not a valid resnetlab config: {e}") from None
