"""Residual blocks. Each takes (in_ch, width, stride, shortcut, stride_in_3x3).

`shortcut=None` builds the plain twin of the block: the same layers, nothing added (the
paper's control network, sec. 4.1). The last BN of a v1 block is what Fig. 7 measures:
its output is the layer response "after BN, before the addition".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Projection, conv1x1, conv3x3


class _Block(nn.Module):
    """What every block shares: its expansion and how it starts as an identity."""

    # Output channels per unit of width: 4 for the bottleneck (paper sec. 3.3).
    expansion = 1

    def zero_init_last(self) -> None:
        """Zero the branch's last layer (BN gamma or conv): the block starts as an identity."""
        raise NotImplementedError


class _PostActBase(_Block):
    """v1 order: the residual branch up to its last BN; that BN, add the shortcut, ReLU."""

    shortcut: nn.Module | None

    @property
    def last_bn(self) -> nn.Module:
        """The branch's last BN: Fig. 7 measures its output."""
        raise NotImplementedError

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch before its last BN."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.last_bn(self.branch(x))
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return F.relu(out)


class BasicBlock(_PostActBase):
    """conv3x3-BN-ReLU-conv3x3-BN, add shortcut, ReLU (paper Fig. 2, left of Fig. 5)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 shortcut: nn.Module | None = None, stride_in_3x3: bool = True) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.shortcut = shortcut

    @property
    def last_bn(self) -> nn.Module:
        return self.bn2

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn1(self.conv1(x))))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(_PostActBase):
    """conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN, add shortcut, ReLU (right of Fig. 5).

    The paper (v1) subsamples in the first 1x1 conv. `stride_in_3x3=True` moves the stride
    to the 3x3 conv (torchvision's "v1.5", Bag of Tricks' ResNet-B): same parameters, more
    multiply-adds, and no longer three quarters of the input ignored by a strided 1x1.
    """

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 shortcut: nn.Module | None = None, stride_in_3x3: bool = False) -> None:
        super().__init__()
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.conv1 = conv1x1(in_ch, width, s1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.shortcut = shortcut

    @property
    def last_bn(self) -> nn.Module:
        return self.bn3

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(out))))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class _PreActBase(_Block):
    """Shared shortcut rule of the v2 blocks."""

    shortcut: nn.Module | None
    # The network's first unit, right after conv1 (ResNet sets it): v2 adopts "the first
    # activation right after conv1 and before splitting into two paths", so its shortcut,
    # identity too, takes the activated input; conv1's raw output would otherwise ride the
    # identity path to the head (timm's resnetv2 basic nets keep it; the authors' code not).
    first: bool = False

    def _add_shortcut(self, out: torch.Tensor, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        if self.shortcut is None:
            return out
        # A projection is a weighted layer and sees the normalised input (v2 sec. 3.1, as in
        # the authors' code); identity and option A carry the raw input, a clean identity path.
        activated = self.first or isinstance(self.shortcut, Projection)
        return out + self.shortcut(pre if activated else x)


class PreActBasicBlock(_PreActBase):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, add shortcut; nothing after the addition (v2)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 shortcut: nn.Module | None = None, stride_in_3x3: bool = True) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return self._add_shortcut(out, x, pre)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(_PreActBase):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4), add shortcut (v2)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1,
                 shortcut: nn.Module | None = None, stride_in_3x3: bool = True) -> None:
        super().__init__()
        s1, s3 = (1, stride) if stride_in_3x3 else (stride, 1)
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv1x1(in_ch, width, s1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, s3)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, width * self.expansion)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        out = self.conv3(F.relu(self.bn3(out)))
        return self._add_shortcut(out, x, pre)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


BLOCKS: dict[tuple[str, bool], type[_Block]] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}
