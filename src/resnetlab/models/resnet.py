"""One parameterised ResNet: every network of the paper and its follow-ups is a set of arguments.

Module names follow torchvision where the two agree (`layer1`.., `conv1`/`bn1` inside blocks),
so checkpoints convert with a short key map (models/convert.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .blocks import BLOCKS, _Block
from .layers import SHORTCUT_OPTIONS, make_shortcut, make_stem

if TYPE_CHECKING:
    from .config import ModelConfig


class Head(nn.Module):
    """Global average pool, then a fully connected classifier (paper Table 1, last row)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x)


class ResNet(nn.Module):
    """Stem, stages of blocks (stride 1 for the first, 2 for the others), head.

    Args:
        block: "basic" (two 3x3) or "bottleneck" (1x1-3x3-1x1, x4 expansion).
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-34/50.
        widths: base width of each stage (the bottleneck's inner width).
        stem: "conv7" (ImageNet), "deep" (ResNet-C) or "cifar" (one 3x3 conv).
        stem_width: channels out of the stem.
        shortcut: paper option "A" (zero-pad), "B" (project on shape change) or "C" (always).
        plain: drop every shortcut: the paper's plain control network.
        stride_in_3x3: bottleneck stride on the 3x3 (ResNet-B / v1.5) instead of the 1x1 (v1).
        avg_down: ResNet-D: subsample shortcuts with a 2x2 average pool, not a strided 1x1.
        preact: pre-activation blocks (ResNet v2) and a final BN-ReLU before the head.
        zero_init_last: start each residual branch at zero (its last BN gamma, or last conv).
    """

    # Set by models/factory.py on the models it makes: name, classes, input size, statistics.
    model_config: ModelConfig

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "conv7",
        stem_width: int = 64,
        shortcut: str = "B",
        plain: bool = False,
        stride_in_3x3: bool = False,
        avg_down: bool = False,
        preact: bool = False,
        zero_init_last: bool = False,
        num_classes: int = 1000,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (block, preact) not in BLOCKS:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if shortcut not in SHORTCUT_OPTIONS:
            raise ValueError(f"shortcut must be one of {SHORTCUT_OPTIONS}, got {shortcut!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(f"layers {tuple(layers)} and widths {tuple(widths)} must pair up")
        if plain and zero_init_last:
            raise ValueError("zero_init_last needs shortcuts: a plain net would output zeros")
        block_cls = BLOCKS[(block, preact)]
        self.num_classes, self.in_chans = num_classes, in_chans
        self.stem = make_stem(stem, in_chans, stem_width, preact)
        ch = stem_width
        self.stage_names: list[str] = []
        self.stage_channels: list[int] = []
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                out_ch = width * block_cls.expansion
                sc = None if plain else \
                    make_shortcut(shortcut, ch, out_ch, stride, avg_down, preact)
                blocks.append(block_cls(ch, width, stride, sc, stride_in_3x3))
                ch = out_ch
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self.stage_channels.append(ch)
        # v2 blocks end on a conv, so the features need one more BN-ReLU (v2 Fig. 4).
        self.final_act = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True)) if preact \
            else nn.Identity()
        self.num_features = ch
        self.head = Head(ch, num_classes)
        self._init_weights(zero_init_last)

    @property
    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, n) for n in self.stage_names]

    def _init_weights(self, zero_init_last: bool) -> None:
        # He et al. 2015 initialisation (paper sec. 3.4, ref. [13]); BN starts as identity.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            self.zero_init_last()

    def zero_init_last(self) -> None:
        """Zero the last layer of every residual branch, so each block starts as an identity."""
        for m in self.modules():
            if isinstance(m, _Block):
                m.zero_init_last()

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage (C2..C5 for the ImageNet family), e.g. for a detection FPN."""
        outs = []
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final_act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
