"""create_model / save_weights / load_model: models by name, weights as safetensors + JSON.

A weights directory holds `model.safetensors` (tensors only: loading it can run no code)
and `config.json` (everything needed to rebuild the model and feed it images).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, overload

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, WeightsError
from ..files import write_atomic
from .config import CONFIG_FILE, WEIGHTS_FILE, ModelConfig
from .registry import build_model, cifar_name, get_spec
from .resnet import FeatureNet, ResNet

log = logging.getLogger(__name__)


def _merge(saved: Any, given: Any, what: str) -> Any:
    if given is not None and given != saved:
        raise ConfigError(f"the weights were saved with {what}={saved!r}, not {given!r}")
    return saved


def _channel_stats(rgb: tuple[float, ...], in_chans: int) -> list[float]:
    """RGB statistics, or their average repeated for other channel counts (1 = grayscale)."""
    return list(rgb) if in_chans == 3 else [round(sum(rgb) / 3, 4)] * in_chans


@overload
def create_model(
    name: str, num_classes: int | None = None, in_chans: int | None = None,
    weights: str | os.PathLike[str] | None = None, *, features_only: Literal[False] = False,
    **overrides: Any) -> ResNet: ...


@overload
def create_model(
    name: str, num_classes: int | None = None, in_chans: int | None = None,
    weights: str | os.PathLike[str] | None = None, *, features_only: Literal[True],
    out_indices: Sequence[int] | None = None, **overrides: Any) -> FeatureNet: ...


def create_model(
    name: str,
    num_classes: int | None = None,
    in_chans: int | None = None,
    weights: str | os.PathLike[str] | None = None,
    *,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    **overrides: Any,
) -> ResNet | FeatureNet:
    """Build a registered model; with `weights`, load a directory written by `save_weights`.

    `overrides` are ResNet arguments (`shortcut="A"`, `zero_init_last=True`, ...).
    `num_classes=0` gives a model that returns pooled features (timm's convention);
    `features_only=True` (with `out_indices`) the backbone alone, as `create_features`.
    """
    if features_only:
        return create_features(name, out_indices, num_classes=num_classes, in_chans=in_chans,
                               weights=weights, **overrides)
    if out_indices is not None:
        raise ConfigError("out_indices goes with features_only=True")
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


def create_features(name: str, out_indices: Sequence[int] | None = None,
                    **kwargs: Any) -> FeatureNet:
    """timm's `features_only`: the named model without its head, returning the feature maps
    at `out_indices` of its feature_info (0 the stem, 1.. the stages; default all).
    `kwargs` as create_model's, `weights` included: the head's weights are left out."""
    return FeatureNet(create_model(name, **kwargs), out_indices)


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
    cfg = _true_head(model, model_config(model))
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


def _true_head(model: nn.Module, cfg: ModelConfig) -> ModelConfig:
    """The config with the class count of the classifier the model has now: a head
    replaced by hand (model.head.fc = nn.Linear(512, 7)) is saved as what it is."""
    fc = getattr(getattr(model, "head", None), "fc", None)
    if fc is None:
        return cfg
    if not isinstance(fc, nn.Linear | nn.Identity):
        raise ConfigError(f"head.fc is a {type(fc).__name__}, which load_model cannot "
                          "rebuild; change the class count with model.reset_classifier(n)")
    n = fc.out_features if isinstance(fc, nn.Linear) else 0
    if n == cfg.num_classes:
        return cfg
    log.info("saving %d classes: the classifier was replaced (config said %d)", n,
             cfg.num_classes)
    names = cfg.class_names if cfg.class_names and len(cfg.class_names) == n else None
    return replace(cfg, num_classes=n, class_names=names)


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
