"""create_model / save_weights / load_model: models by name, weights as safetensors + JSON.

A weights directory holds `model.safetensors` (tensors only: loading it can run no code)
and `config.json` (everything needed to rebuild the model and feed it images).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, WeightsError
from ..files import write_atomic
from .config import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from .registry import build_model, cifar_name, get_spec
from .resnet import ResNet


def _merge(saved: Any, given: Any, what: str) -> Any:
    if given is not None and given != saved:
        raise ConfigError(f"the weights were saved with {what}={saved!r}, not {given!r}")
    return saved


def _channel_stats(rgb: tuple[float, ...], in_chans: int) -> list[float]:
    """RGB statistics, or their average repeated for other channel counts (1 = grayscale)."""
    return list(rgb) if in_chans == 3 else [round(sum(rgb) / 3, 4)] * in_chans


def create_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> ResNet:
    """Build a registered model; with `weights`, load a directory written by `save_weights`.

    `overrides` are ResNet arguments (`shortcut="A"`, `zero_init_last=True`, ...).
    """
    spec = get_spec(name)
    saved = ModelConfig.from_json(Path(weights) / CONFIG_FILE) if weights is not None else None
    if saved is not None:
        if saved.architecture != name:
            raise ConfigError(f"{weights} holds a {saved.architecture}, not a {name}")
        num_classes = _merge(saved.num_classes, num_classes, "num_classes")
        in_chans = _merge(saved.in_chans, in_chans, "in_chans")
        defaults = {k: p.default for k, p in inspect.signature(ResNet).parameters.items()}
        for k, v in overrides.items():
            _merge(saved.overrides.get(k, spec.arch.get(k, defaults.get(k))), v, k)
        overrides = {**saved.overrides, **overrides}
    num_classes = spec.num_classes if num_classes is None else num_classes
    in_chans = 3 if in_chans is None else in_chans
    model = build_model(spec, num_classes, in_chans, overrides)
    mean, std = _channel_stats(spec.mean, in_chans), _channel_stats(spec.std, in_chans)
    model.model_config = saved or ModelConfig(
        architecture=name, num_classes=num_classes, in_chans=in_chans,
        input_size=spec.input_size, mean=mean, std=std, overrides=dict(overrides))
    if weights is not None:
        load_weights(model, weights)
    return model


def cifar_resnet(depth: int, plain: bool = False, preact: bool = False,
                 bottleneck: bool = False, num_classes: int = 10, in_chans: int = 3,
                 **overrides: Any) -> ResNet:
    """Any CIFAR-style depth: 6n+2 (basic blocks) or 9n+2 (`bottleneck=True`), built as
    `create_model("cifar_resnet<depth>")` so that `save_weights` and `load_model` work."""
    return create_model(cifar_name(depth, plain, preact, bottleneck), num_classes=num_classes,
                        in_chans=in_chans, **overrides)


def load_model(weights: str | os.PathLike[str]) -> ResNet:
    """Rebuild and load the model in a weights directory, whatever its architecture."""
    cfg = ModelConfig.from_json(Path(weights) / CONFIG_FILE)
    return create_model(cfg.architecture, weights=weights)


def model_config(model: nn.Module) -> ModelConfig:
    cfg = getattr(model, "model_config", None)
    if not isinstance(cfg, ModelConfig):
        raise ConfigError("this model was not made by resnetlab.create_model; use it to build one")
    return cfg


def save_weights(
    model: nn.Module,
    directory: str | os.PathLike[str],
    class_names: list[str] | None = None,
    **config: Any,
) -> Path:
    """Write `model.safetensors` and `config.json` into `directory`, each atomically.

    `config` may set `input_size`, `mean` or `std` of the data the model was trained on.
    """
    cfg = model_config(model)
    unknown = set(config) - {"input_size", "mean", "std"}
    if unknown:
        raise ConfigError(f"save_weights got unknown field(s) {sorted(unknown)}")
    data = {**asdict(cfg), **{k: list(v) if isinstance(v, tuple) else v
                              for k, v in config.items()}}
    if class_names is not None:
        if len(class_names) != cfg.num_classes:
            raise ConfigError(f"{len(class_names)} class names for {cfg.num_classes} classes")
        data["class_names"] = list(class_names)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    write_atomic(out / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(out / CONFIG_FILE, lambda p: Path(p).write_text(text))
    model.model_config = ModelConfig(**data)  # type: ignore[assignment]  # any nn.Module
    return out


def load_weights(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Load `model.safetensors` strictly, with a one-line error naming what does not match."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a readable safetensors file: {e}") from None
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise WeightsError unless `state` has exactly the model's keys and shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected (first: {extra[0]})")
    if shapes:
        problems.append(f"{len(shapes)} of another shape (first: {shapes[0]})")
    if problems:
        raise WeightsError(f"{source} does not fit this architecture: " + "; ".join(problems))
