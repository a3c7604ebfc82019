"""State-dict conversion between torchvision's ResNets and resnetlab's.

Only the stem, the shortcut and the head are named differently; blocks match one to one.
torchvision's bottleneck nets put the stride on the 3x3 (v1.5), so they pair with our `b`
variants (`resnet50b`, ...); resnet18/34 pair with ours directly.
"""

from __future__ import annotations

import re

import torch

# (torchvision key prefix, resnetlab key prefix); "BLOCK" stands for a block's own prefix
# (layer<i>.<j>). Each direction of the map is a bijection on ResNet keys.
_PREFIXES = [
    ("conv1.", "stem.conv."),
    ("bn1.", "stem.bn."),
    ("BLOCK.downsample.0.", "BLOCK.shortcut.conv."),
    ("BLOCK.downsample.1.", "BLOCK.shortcut.bn."),
    ("fc.", "head.fc."),
]


def _rule(source: str, target: str) -> tuple[str, str]:
    """A regex rule rewriting the prefix `source` as `target`."""
    pattern = "^" + re.escape(source).replace("BLOCK", r"(layer\d+\.\d+)")
    return pattern, target.replace("BLOCK", r"\1")


_TV_TO_OURS = [_rule(tv, ours) for tv, ours in _PREFIXES]
_OURS_TO_TV = [_rule(ours, tv) for tv, ours in _PREFIXES]

TORCHVISION_PAIRS = {
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50b",
    "resnet101": "resnet101b", "resnet152": "resnet152b",
}


def _rename(
    state: dict[str, torch.Tensor], rules: list[tuple[str, str]]
) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision resnet state_dict, renamed for the matching resnetlab model."""
    return _rename(state, _TV_TO_OURS)


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A resnetlab state_dict (conv7 stem, option B, no preact) renamed for torchvision."""
    return _rename(state, _OURS_TO_TV)
