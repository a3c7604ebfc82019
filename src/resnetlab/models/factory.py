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
from .blocks import _PreActBase
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

    Args:
        name: a registered model (`list_models()`), or `cifar_resnetN` for any CIFAR depth.
        num_classes: classifier outputs; None: the model's own (1000 ImageNet, 10 CIFAR),
            or the weights'. 0 gives a model that returns pooled features (timm's
            convention).
        in_chans: input channels; None: 3, or the weights'.
        weights: a directory written by `save_weights` (or a run's `final/`) to load.
        features_only: return the backbone alone, as `create_features`.
        out_indices: with `features_only`, which feature maps to return.
        **overrides: `ResNet` arguments (`shortcut="A"`, `zero_init_last=True`,
            `stride_in_3x3`, `avg_down`, `stem`, `plain`, `preact`, ...).

    Returns:
        The model (a `ResNet`), or a `FeatureNet` with `features_only=True`. Its
        `model_config` records what `save_weights` writes beside the weights.

    Raises:
        UnknownModelError: `name` is not registered (the message names the nearest ones).
        ConfigError: an override or argument that does not fit the model or the weights.
        WeightsError: `weights` is missing, unreadable or of another shape.

    Examples:
        >>> import resnetlab, torch
        >>> model = resnetlab.create_model("resnet34", shortcut="A")
        >>> model = resnetlab.create_model("resnet20", in_chans=1, num_classes=10)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
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
    if saved is not None and saved.format_version < 2:
        _as_version_1(model)
    if weights is not None:
        load_weights(model, weights)
    return model


def _as_version_1(model: ResNet) -> None:
    """Weights saved before format 2 were trained with a pre-activation net's first unit
    carrying conv1's raw output on its shortcut: they compute what they learned so."""
    units = [m for m in model.modules() if isinstance(m, _PreActBase) and m.first]
    for m in units:
        m.first = False
    if units:
        log.info("weights of format 1: the first unit's shortcut carries conv1's raw output, "
                 "as when they were trained")


def create_features(name: str, out_indices: Sequence[int] | None = None,
                    **kwargs: Any) -> FeatureNet:
    """timm's `features_only`: the named model without its head, returning feature maps.

    Args:
        name: a registered model, as for `create_model`.
        out_indices: which of its `feature_info` entries to return (0 the stem, 1.. the
            stages); None: all.
        **kwargs: as `create_model`'s, `weights` included (the head's weights are left out).

    Returns:
        A module whose forward returns a list of feature maps.

    Raises:
        UnknownModelError: `name` is not registered.
        ConfigError: an index out of range, or an argument that does not fit.

    Examples:
        >>> import resnetlab, torch
        >>> net = resnetlab.create_features("resnet50", out_indices=(2, 3, 4))
        >>> [tuple(f.shape) for f in net(torch.zeros(1, 3, 224, 224))]
        [(1, 512, 28, 28), (1, 1024, 14, 14), (1, 2048, 7, 7)]
    """
    return FeatureNet(create_model(name, **kwargs), out_indices)


def cifar_resnet(depth: int, plain: bool = False, preact: bool = False,
                 bottleneck: bool = False, num_classes: int = 10, in_chans: int = 3,
                 **overrides: Any) -> ResNet:
    """Any CIFAR-style depth (paper sec. 4.2): 6n+2 with basic blocks, 9n+2 with bottlenecks.

    Built as `create_model("cifar_resnet<depth>")`, so that `save_weights` and
    `load_model` work as for any registered model.

    Args:
        depth: layers with weights: 6n+2 (basic blocks) or 9n+2 (`bottleneck=True`).
        plain: the plain twin, without shortcuts.
        preact: pre-activation (v2) blocks.
        bottleneck: bottleneck blocks (Identity Mappings' 164 and 1001 layers).
        num_classes: classifier outputs.
        in_chans: input channels.
        **overrides: further `ResNet` arguments (`shortcut="B"`, ...).

    Returns:
        The model.

    Raises:
        ConfigError: a depth that is not 6n+2 (or 9n+2), saying which depths are.

    Examples:
        >>> import resnetlab
        >>> resnetlab.cifar_resnet(74).model_config.architecture
        'cifar_resnet74'
    """
    return create_model(cifar_name(depth, plain, preact, bottleneck), num_classes=num_classes,
                        in_chans=in_chans, **overrides)


def load_model(weights: str | os.PathLike[str]) -> ResNet:
    """Rebuild and load the model in a weights directory, whatever its architecture.

    Nothing is unpickled: the architecture comes from `config.json`, the tensors from
    `model.safetensors`.

    Args:
        weights: a directory written by `save_weights`, or a run's `final/`.

    Returns:
        The model with its weights, in train mode as `create_model` returns it.

    Raises:
        WeightsError: a file is missing or unreadable, or the tensors do not fit.
        ConfigError: `config.json` names an architecture or option that does not exist.

    Examples:
        >>> import resnetlab, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _ = resnetlab.save_weights(resnetlab.create_model("resnet8"), folder)
        >>> resnetlab.load_model(folder).model_config.architecture
        'resnet8'
    """
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

    Args:
        model: a model made by `create_model` (its `model_config` says how to rebuild it).
        directory: where to write; created if missing. Files of the same names there are
            replaced, each only once the new one is complete.
        class_names: a name per class, kept in `config.json` (what `predict` prints).
        **config: `input_size`, `mean`, `std` or `crop_pct` (the evaluation's centre crop)
            of the data the model was trained on.

    Returns:
        The directory.

    Raises:
        ConfigError: the model was not made by `create_model`, `class_names` does not
            match the class count, or `config` has another key.

    Examples:
        >>> import resnetlab, tempfile
        >>> model = resnetlab.create_model("resnet8", num_classes=2)
        >>> folder = resnetlab.save_weights(model, tempfile.mkdtemp(), class_names=["a", "b"])
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    cfg = _true_head(model, model_config(model))
    unknown = set(config) - {"input_size", "mean", "std", "crop_pct"}
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
    """Load `directory/model.safetensors` into `model` strictly.

    Args:
        model: the model to load into (its keys and shapes must match exactly).
        directory: a directory written by `save_weights`.

    Raises:
        WeightsError: the file is missing or unreadable, or keys or shapes differ (one
            line naming what does not match).

    Examples:
        >>> import resnetlab, tempfile
        >>> folder = resnetlab.save_weights(resnetlab.create_model("resnet8"), tempfile.mkdtemp())
        >>> resnetlab.load_weights(resnetlab.create_model("resnet8"), folder)
    """
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
