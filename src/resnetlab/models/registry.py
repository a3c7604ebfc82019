"""Named models as rows of a table, built from depth tables (paper Table 1 and sec. 4.2)."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, UnknownModelError
from .resnet import ResNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

# Paper Table 1: block type and blocks per stage (conv2_x .. conv5_x).
IMAGENET_DEPTHS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
# Paper Table 1, last row: multiply-adds at 224x224.
PAPER_MACS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9,
              "resnet152": 11.3e9}
# Paper sec. 4.2: 6n+2 layers; Identity Mappings' bottleneck nets: 9n+2 layers.
CIFAR_DEPTHS = (8, 14, 20, 32, 44, 56, 110, 1202)  # 8 and 14: small nets for quick runs
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)
CIFAR_PREACT_DEPTHS = (110, 164, 1001)


@dataclass(frozen=True)
class ModelSpec:
    """One registry row: the ResNet arguments of a named model and its native data."""

    name: str
    family: str  # "imagenet" or "cifar"
    depth: int
    arch: dict[str, Any] = field(hash=False)
    num_classes: int
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def block(self) -> str:
        return str(self.arch["block"])

    @property
    def shortcut(self) -> str:
        return "none" if self.arch.get("plain") else str(self.arch["shortcut"])


def imagenet_arch(depth: int) -> dict[str, Any]:
    """ResNet arguments of paper Table 1 (v1: bottleneck stride on the first 1x1, option B)."""
    if depth not in IMAGENET_DEPTHS:
        raise ConfigError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}")
    block, layers = IMAGENET_DEPTHS[depth]
    return dict(block=block, layers=layers, widths=(64, 128, 256, 512), stem="conv7",
                stem_width=64, shortcut="B", stride_in_3x3=False)


def cifar_arch(depth: int, bottleneck: bool = False) -> dict[str, Any]:
    """ResNet arguments of paper sec. 4.2: 16/32/64 filters, 6n+2 layers (9n+2 for bottlenecks)."""
    per_block = 3 if bottleneck else 2
    n, rem = divmod(depth - 2, 3 * per_block)
    if rem or n < 1:
        rule = "9n+2 (e.g. 164, 1001)" if bottleneck else "6n+2 (e.g. 20, 32, 44, 56, 110)"
        raise ConfigError(f"CIFAR ResNet depth must be {rule}, got {depth}")
    # Option A keeps ResNet and plain parameters equal (sec. 4.2); the bottleneck nets of
    # Identity Mappings grow 16 -> 64 channels in their first block, which they project, and
    # subsample on the first 1x1 as the authors' code (resnet-1k-layers) does, not on the 3x3
    # as torchvision's and timm's ImageNet nets: same parameters, 244.5M mult-adds for
    # preact_resnet164 against 247.7M (`resnetlab info` says where a bottleneck net strides).
    return dict(block="bottleneck" if bottleneck else "basic", layers=(n, n, n),
                widths=(16, 32, 64), stem="cifar", stem_width=16,
                shortcut="B" if bottleneck else "A", stride_in_3x3=not bottleneck)


def _build_table() -> dict[str, ModelSpec]:
    rows: list[ModelSpec] = []

    def add(name: str, family: str, depth: int, arch: dict[str, Any]) -> None:
        if family == "imagenet":
            rows.append(ModelSpec(name, family, depth, arch, 1000, 224, IMAGENET_MEAN,
                                  IMAGENET_STD))
        else:
            rows.append(ModelSpec(name, family, depth, arch, 10, 32, CIFAR_MEAN, CIFAR_STD))

    for d in IMAGENET_DEPTHS:
        base = imagenet_arch(d)
        add(f"resnet{d}", "imagenet", d, base)
        add(f"plain{d}", "imagenet", d, {**base, "plain": True})
        # Bag of Tricks tweaks are cumulative, as in its Table 5: B, then C = B + deep
        # stem, then D = C + average-pool shortcut. B changes nothing in a basic block.
        b = {**base, "stride_in_3x3": True}
        if base["block"] == "bottleneck":
            add(f"resnet{d}b", "imagenet", d, b)
        c = {**b, "stem": "deep"}
        add(f"resnet{d}c", "imagenet", d, c)
        add(f"resnet{d}d", "imagenet", d, {**c, "avg_down": True})
        add(f"preact_resnet{d}", "imagenet", d, {**b, "preact": True})
    for d in CIFAR_DEPTHS:
        add(f"resnet{d}", "cifar", d, cifar_arch(d))
    for d in CIFAR_PLAIN_DEPTHS:
        add(f"plain{d}", "cifar", d, {**cifar_arch(d), "plain": True})
    for d in CIFAR_PREACT_DEPTHS:
        add(f"preact_resnet{d}", "cifar", d,
            {**cifar_arch(d, bottleneck=d in (164, 1001)), "preact": True})
    return {r.name: r for r in rows}


MODELS: dict[str, ModelSpec] = _build_table()
ARCH_KEYS = tuple(p for p in inspect.signature(ResNet).parameters if p not in
                  ("num_classes", "in_chans"))


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, in table order.

    Args:
        pattern: an `fnmatch` pattern (`"resnet5?"`, `"preact*"`); default all.

    Returns:
        The matching names; any CIFAR depth 6n+2 is also built on request as
        `cifar_resnetN`, which is not listed.

    Examples:
        >>> import resnetlab
        >>> resnetlab.list_models("resnet5?")
        ['resnet50', 'resnet56']
    """
    return [n for n in MODELS if fnmatch.fnmatch(n, pattern)]


# Any CIFAR depth by name (`cifar_resnet74`, `cifar_plain74`,
# `cifar_preact_resnet47_bottleneck`): what `cifar_resnet` builds, so the name in its
# config.json rebuilds it. A prefix because ResNet-50 and ResNet-152 are also 6n+2.
_CIFAR_NAME = re.compile(r"cifar_(resnet|plain|preact_resnet)(\d+)(_bottleneck)?")


def cifar_name(depth: int, plain: bool = False, preact: bool = False,
               bottleneck: bool = False) -> str:
    kind = "plain" if plain else "preact_resnet" if preact else "resnet"
    return f"cifar_{kind}{depth}{'_bottleneck' if bottleneck else ''}"


def _cifar_spec(name: str) -> ModelSpec | None:
    m = _CIFAR_NAME.fullmatch(name)
    if m is None:
        return None
    kind, depth, bottleneck = m.group(1), int(m.group(2)), bool(m.group(3))
    arch = {**cifar_arch(depth, bottleneck), "plain": kind == "plain",
            "preact": kind == "preact_resnet"}
    return ModelSpec(name, "cifar", depth, arch, 10, 32, CIFAR_MEAN, CIFAR_STD)


def get_spec(name: str) -> ModelSpec:
    """The registry row of `name` (or of a `cifar_*` name of any depth); a wrong name gets
    the closest names in the error."""
    if name in MODELS:
        return MODELS[name]
    spec = _cifar_spec(name)
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name, list(MODELS), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else \
        "; `resnetlab models` lists them all (and cifar_resnetN builds any 6n+2 depth)"
    raise UnknownModelError(f"unknown model {name!r}{hint}")


def build_model(spec: ModelSpec, num_classes: int, in_chans: int,
                overrides: dict[str, Any]) -> ResNet:
    """Instantiate a registry row with validated architecture overrides."""
    bad = sorted(set(overrides) - set(ARCH_KEYS))
    if bad:
        raise ConfigError(f"unknown model option(s) {bad}; valid: {', '.join(ARCH_KEYS)}")
    try:
        model = ResNet(**{**spec.arch, **overrides}, num_classes=num_classes, in_chans=in_chans)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{spec.name}: {e}") from None
    return model
