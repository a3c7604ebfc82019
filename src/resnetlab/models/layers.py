"""Small building pieces: conv helpers, shortcuts (paper options A/B/C) and stems."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUT_OPTIONS = ("A", "B", "C")
STEM_KINDS = ("conv7", "deep", "cifar")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows or precedes it)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


def _subsample(x: torch.Tensor, stride: int, avg_down: bool) -> torch.Tensor:
    if stride == 1:
        return x
    if avg_down:
        return F.avg_pool2d(x, stride, stride, ceil_mode=True, count_include_pad=False)
    # Exactly x[:, :, ::stride, ::stride], but the pool's gradient keeps a channels_last
    # layout where the slice's comes back NCHW and costs the next kernel a copy.
    return F.avg_pool2d(x, 1, stride)


class ZeroPadShortcut(nn.Module):
    """Option A (paper Table 3): identity, subsampled by the stride, with zero channels appended.

    Parameter-free, so a residual net and its plain twin hold the same parameters (sec. 4.2).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, avg_down: bool = False) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option A cannot reduce channels ({in_ch} -> {out_ch})")
        self.extra, self.stride, self.avg_down = out_ch - in_ch, stride, avg_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _subsample(x, self.stride, self.avg_down)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class Projection(nn.Module):
    """Options B/C: 1x1 conv (+ BN) shortcut; ResNet-D first subsamples with a 2x2 average pool.

    ResNet-D (Bag of Tricks sec. 4.1) moves the stride off the 1x1 conv, which would otherwise
    ignore three quarters of its input.
    """

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, avg_down: bool = False, norm: bool = True
    ) -> None:
        super().__init__()
        self.pool: nn.Module = nn.Identity()
        if avg_down and stride > 1:
            self.pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)
            stride = 1
        self.conv = conv1x1(in_ch, out_ch, stride)
        # Pre-activation nets project the already normalised input, so no BN here (v2).
        self.bn: nn.Module = nn.BatchNorm2d(out_ch) if norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.pool(x)))


def make_shortcut(
    option: str, in_ch: int, out_ch: int, stride: int, avg_down: bool, preact: bool
) -> nn.Module:
    """The shortcut of one block for paper option A, B or C."""
    if option not in SHORTCUT_OPTIONS:
        raise ValueError(f"shortcut must be one of {SHORTCUT_OPTIONS}, got {option!r}")
    same_shape = in_ch == out_ch and stride == 1
    if same_shape and option != "C":
        return nn.Identity()
    if option == "A":
        return ZeroPadShortcut(in_ch, out_ch, stride, avg_down)
    return Projection(in_ch, out_ch, stride, avg_down, norm=not preact)


def make_stem(kind: str, in_chans: int, width: int, preact: bool) -> nn.Sequential:
    """The layers before the first stage.

    conv7: paper Table 1's 7x7/2 conv and 3x3/2 max pool. deep: ResNet-C's three 3x3 convs
    (widths width/2, width/2, width) then the max pool. cifar: sec. 4.2's single 3x3 conv.
    A pre-activation stem ends with a conv, since the first block normalises its input.
    """
    if kind not in STEM_KINDS:
        raise ValueError(f"stem must be one of {STEM_KINDS}, got {kind!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if kind == "conv7":
        layers["conv"] = nn.Conv2d(in_chans, width, 7, stride=2, padding=3, bias=False)
    elif kind == "cifar":
        layers["conv"] = conv3x3(in_chans, width)
    else:
        mid = width // 2
        layers.update(
            conv1=conv3x3(in_chans, mid, 2), bn1=nn.BatchNorm2d(mid), relu1=nn.ReLU(inplace=True),
            conv2=conv3x3(mid, mid), bn2=nn.BatchNorm2d(mid), relu2=nn.ReLU(inplace=True),
            conv3=conv3x3(mid, width),
        )
    if not preact:
        layers["bn"] = nn.BatchNorm2d(width)
        layers["relu"] = nn.ReLU(inplace=True)
    if kind != "cifar":
        layers["pool"] = nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Sequential(layers)
