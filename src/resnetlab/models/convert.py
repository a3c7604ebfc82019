"""State-dict conversion between torchvision's ResNets and resnetlab's.

Only the stem, the shortcut and the head are named differently; blocks match one to one.
torchvision's bottleneck nets put the stride on the 3x3 (v1.5), so they pair with our `b`
variants (`resnet50b`, ...); resnet18/34 pair with ours directly.
"""

from __future__ import annotations

import re

import torch

# (torchvision pattern, resnetlab replacement); each map is a bijection on ResNet keys.
_TV_TO_OURS = [
    (r"^conv1\.", "stem.conv."),
    (r"^bn1\.", "stem.bn."),
    (r"^(layer\d+\.\d+)\.downsample\.0\.", r"\1.shortcut.conv."),
    (r"^(layer\d+\.\d+)\.downsample\.1\.", r"\1.shortcut.bn."),
    (r"^fc\.", "head.fc."),
]
_OURS_TO_TV = [
    (r"^stem\.conv\.", "conv1."),
    (r"^stem\.bn\.", "bn1."),
    (r"^(layer\d+\.\d+)\.shortcut\.conv\.", r"\1.downsample.0."),
    (r"^(layer\d+\.\d+)\.shortcut\.bn\.", r"\1.downsample.1."),
    (r"^head\.fc\.", "fc."),
]

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
