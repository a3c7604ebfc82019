"""Parameter and multiply-add counts, per stage in the style of paper Table 1.

Counting runs on the meta device: shapes only, no memory and no arithmetic, so even
ResNet-1202 is counted in a blink. torch.utils.flop_counter reports FLOPs = 2 x
multiply-adds for convolutions and matrix products; the paper's "FLOPs" are multiply-adds,
so we halve. BN, ReLU, pooling and additions are not counted (nor are they in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .registry import ARCH_KEYS, get_spec
from .resnet import ResNet


@dataclass(frozen=True)
class StageRow:
    name: str
    output: tuple[int, ...]  # (C, H, W) or (classes,)
    blocks: int
    params: int
    macs: int


def count_params(module: nn.Module) -> int:
    """Parameters of `module` (BatchNorm's running statistics are buffers, not counted).

    Examples:
        >>> import resnetlab
        >>> resnetlab.count_params(resnetlab.create_model("resnet50"))
        25557032
    """
    return sum(p.numel() for p in module.parameters())


def _macs(fn: Any, *args: Any) -> tuple[int, torch.Tensor]:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
    return counter.get_total_flops() // 2, out


def meta_model(name: str, **kwargs: Any) -> ResNet:
    """A registered model on the meta device (no storage), for counting."""
    from .factory import create_model

    with torch.device("meta"):
        return create_model(name, **kwargs)


def stage_table(model: ResNet, input_size: int, in_chans: int | None = None) -> list[StageRow]:
    """Paper Table 1's view of a model: stem, each stage and the head.

    Args:
        model: the model to count.
        input_size: the side of the square input image.
        in_chans: input channels; None: the model's.

    Returns:
        One `StageRow` per part: its name, output shape, blocks, parameters and
        multiply-accumulates (the unit the paper calls FLOPs).

    Examples:
        >>> import resnetlab
        >>> rows = resnetlab.stage_table(resnetlab.create_model("resnet34"), 224)
        >>> [(r.name, r.output) for r in rows][1:3]
        [('layer1', (64, 56, 56)), ('layer2', (128, 28, 28))]
    """
    device = next(model.parameters()).device
    c = model.in_chans if in_chans is None else in_chans
    x = torch.zeros(1, c, input_size, input_size, device=device)
    rows = []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, x = _macs(model.stem, x)
        rows.append(StageRow("stem", tuple(x.shape[1:]), 0, count_params(model.stem), macs))
        for name, stage in zip(model.stage_names, model.stages, strict=True):
            macs, x = _macs(stage, x)
            rows.append(StageRow(name, tuple(x.shape[1:]), len(stage), count_params(stage), macs))
        macs, x = _macs(lambda t: model.forward_head(model.final_act(t)), x)
        head_params = count_params(model.head) + count_params(model.final_act)
        rows.append(StageRow("head", tuple(x.shape[1:]), 0, head_params, macs))
    model.train(was_training)
    return rows


def model_summary(name: str, input_size: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """Registry facts and totals of one model, as `resnetlab models` prints them.

    Counted on the meta device: no memory is allocated for the weights.

    Args:
        name: a registered model.
        input_size: the side of the input image; None: the model's native size.
        **kwargs: `create_model` arguments (`shortcut="A"`, `num_classes=...`).

    Returns:
        A mapping of name, family, block, shortcut, depth, input_size, params and macs.

    Raises:
        UnknownModelError: `name` is not registered.

    Examples:
        >>> import resnetlab
        >>> s = resnetlab.model_summary("resnet152")
        >>> s["params"], round(s["macs"] / 1e9, 2)
        (60192808, 11.28)
    """
    spec = get_spec(name)
    arch = {**spec.arch, **{k: v for k, v in kwargs.items() if k in ARCH_KEYS}}
    model = meta_model(name, **kwargs)
    size = input_size or spec.input_size
    rows = stage_table(model, size)
    return {
        "name": name, "family": spec.family, "block": spec.block,
        "shortcut": "none" if arch.get("plain") else arch["shortcut"],
        "depth": spec.depth, "input_size": size, "params": sum(r.params for r in rows),
        "macs": sum(r.macs for r in rows),
    }
