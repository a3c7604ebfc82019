"""Fold each BatchNorm into the convolution before it, for inference.

In eval mode a BN is a per-channel affine map, so conv -> BN is one conv with rescaled
weights and a bias: the same function with one pass over the activations fewer. Only
conv -> BN pairs fold: the v1 blocks, the stems and the B/C projections. A pre-activation
(v2) block applies BN -> ReLU -> conv, and the ReLU between them forbids folding, so its BNs
stay (and the v2 stem has no BN after its conv).
"""

from __future__ import annotations

import copy
import itertools

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..models.blocks import _PostActBase
from ..models.layers import Projection

# conv -> BN pairs inside the v1 blocks (the bottleneck adds the third).
_BLOCK_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> int:
    conv, bn = getattr(parent, conv_name, None), getattr(parent, bn_name, None)
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return 0
    setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
    setattr(parent, bn_name, nn.Identity())
    return 1


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with every foldable BN folded into its conv."""
    model = copy.deepcopy(model).eval()
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, _PostActBase):
            folded += sum(_fold_pair(module, c, b) for c, b in _BLOCK_PAIRS)
        elif isinstance(module, Projection):
            folded += _fold_pair(module, "conv", "bn")
        elif isinstance(module, nn.Sequential):  # stems: children run in this order
            names = list(module._modules)
            for a, b in itertools.pairwise(names):
                folded += _fold_pair(module, a, b)
    model.folded_batchnorms = folded  # type: ignore[assignment]  # a plain int on the copy
    return model
