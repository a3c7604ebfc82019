"""One parameterised ResNet: every network of the paper and its follow-ups is a set of arguments.

Module names follow torchvision where the two agree (`layer1`.., `conv1`/`bn1` inside blocks),
so checkpoints convert with a short key map (models/convert.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .blocks import BLOCKS, _Block, _PreActBase
from .layers import SHORTCUT_OPTIONS, make_shortcut, make_stem

if TYPE_CHECKING:
    from .config import ModelConfig


def classifier(in_features: int, num_classes: int) -> nn.Module:
    """The last layer: a Linear, or with 0 classes none at all, so the model returns its
    pooled features (as timm's num_classes=0)."""
    if num_classes < 0:
        raise ValueError(f"num_classes must be 0 or more, got {num_classes}")
    return nn.Linear(in_features, num_classes) if num_classes else nn.Identity()


@contextlib.contextmanager
def _bn_stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm running statistics left as they are: a checkpointed block runs its forward
    twice, and the recomputation must not move them a second time."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
             for m in bns]
    for m in bns:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved, strict=True):
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _recompute_contexts(block: nn.Module) -> tuple[contextlib.AbstractContextManager[None],
                                                  contextlib.AbstractContextManager[None]]:
    """For torch.utils.checkpoint: nothing around the first forward, frozen BatchNorm
    statistics around the recomputation."""
    return contextlib.nullcontext(), _bn_stats_frozen(block)


class Head(nn.Module):
    """Global average pool, then a fully connected classifier (paper Table 1, last row)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = classifier(in_features, num_classes)

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
        num_classes: classifier outputs; 0: the head returns pooled features.
        in_chans: input channels.

    Raises:
        ValueError: a block or shortcut option that does not exist, layers and widths of
            different lengths, or zero_init_last on a plain net (`create_model` turns it
            into a ConfigError).

    Examples:
        >>> import torch
        >>> from resnetlab import ResNet
        >>> net = ResNet("basic", (3, 3, 3), widths=(16, 32, 64), stem="cifar", stem_width=16,
        ...              shortcut="A", num_classes=10)   # ResNet-20, paper sec. 4.2
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
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
        self.grad_checkpointing = False
        self.stem = make_stem(stem, in_chans, stem_width, preact)
        self.stem_width, self.stem_reduction = stem_width, 1 if stem == "cifar" else 4
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
                unit = block_cls(ch, width, stride, sc, stride_in_3x3)
                if isinstance(unit, _PreActBase):
                    unit.first = i == j == 0
                blocks.append(unit)
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

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """timm's feature description: channels, total stride and module of the stem's output
        (index 0) and of every stage's (1..); what forward_intermediates and features_only
        return."""
        info = [{"num_chs": self.stem_width, "reduction": self.stem_reduction, "module": "stem"}]
        for i, (name, ch) in enumerate(zip(self.stage_names, self.stage_channels, strict=True)):
            info.append({"num_chs": ch, "reduction": self.stem_reduction * 2 ** i,
                         "module": name})
        return info

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        """timm's description of the input the weights expect (from model_config): what
        `predict` does to an image, for code written against timm."""
        cfg = self.model_config
        return {"architecture": cfg.architecture, "num_classes": self.num_classes,
                "input_size": (cfg.in_chans, cfg.input_size, cfg.input_size),
                "mean": tuple(cfg.mean), "std": tuple(cfg.std),
                "crop_pct": cfg.resolved_crop_pct, "crop_mode": "center",
                "interpolation": cfg.interpolation,
                "first_conv": "stem.conv" if hasattr(self.stem, "conv") else "stem.conv1",
                "classifier": "head.fc"}

    def get_classifier(self) -> nn.Module:
        """The classifier, `head.fc` (an `nn.Identity` when num_classes is 0)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier for num_classes (0: the model returns pooled features), freshly
        initialised, on the old one's device and dtype; model_config follows, so that
        save_weights writes what load_model rebuilds."""
        ref = self.head.fc.weight if isinstance(self.head.fc, nn.Linear) else \
            next(self.parameters())
        self.head.fc = classifier(self.num_features, num_classes).to(ref.device, ref.dtype)
        self.num_classes = num_classes
        cfg = getattr(self, "model_config", None)
        if cfg is not None:
            self.model_config = dataclasses.replace(cfg, num_classes=num_classes,
                                                    class_names=None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations during the backward pass instead of keeping
        them: less memory for about one more forward pass of compute; gradients and
        BatchNorm statistics as without."""
        self.grad_checkpointing = enable

    def _stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            x = checkpoint(block, x, use_reentrant=False,
                           context_fn=functools.partial(_recompute_contexts, block))
        return x

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] | None = None,
                              intermediates_only: bool = False
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """The feature maps at `indices` of feature_info (default: all), and unless
        intermediates_only the final features too. The last stage's map is taken after the
        pre-activation nets' final BN-ReLU, as forward_features returns it."""
        last = len(self.stage_names)
        take = set(range(last + 1) if indices is None else indices)
        if not take <= set(range(last + 1)):
            raise ValueError(f"indices must be in 0..{last}, got {sorted(take)}")
        x = self.stem(x)
        maps = [x] if 0 in take else []
        for i, stage in enumerate(self.stages, 1):
            x = self._stage(stage, x)
            if i == last:
                x = self.final_act(x)
            if i in take:
                maps.append(x)
        return maps if intermediates_only else (x, maps)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage (C2..C5 for the ImageNet family), e.g. for a detection FPN."""
        maps = self.forward_intermediates(x, range(1, len(self.stage_names) + 1), True)
        assert isinstance(maps, list)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (N, C, H/32, W/32 for the ImageNet family), before
        pooling; after the final BN-ReLU of the pre-activation nets."""
        x = self.stem(x)
        for stage in self.stages:
            x = self._stage(stage, x)
        return self.final_act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global average pooling, then the classifier; `pre_logits`: the pooled features."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of images (N, in_chans, H, W), global pooling: any size."""
        return self.forward_head(self.forward_features(x))


class FeatureNet(nn.Module):
    """The backbone alone (timm's features_only): forward returns the feature maps at
    out_indices of the model's feature_info. Modules keep the model's names, so a full
    model's state_dict loads with its head keys left out."""

    def __init__(self, model: ResNet, out_indices: Sequence[int] | None = None) -> None:
        super().__init__()
        n = len(model.stage_names)
        self.out_indices = tuple(range(n + 1) if out_indices is None else out_indices)
        if not set(self.out_indices) <= set(range(n + 1)):
            raise ConfigError(f"out_indices must be in 0..{n}, got {self.out_indices}")
        self.feature_info = [model.feature_info[i] for i in self.out_indices]
        self.model_config = getattr(model, "model_config", None)
        self.stem = model.stem
        self.stage_names = model.stage_names[:max(self.out_indices, default=0)]
        for name in self.stage_names:
            self.add_module(name, getattr(model, name))
        self.final_act = model.final_act if len(self.stage_names) == n else nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = [x] if 0 in self.out_indices else []
        for i, name in enumerate(self.stage_names, 1):
            x = getattr(self, name)(x)
            if i == len(self.stage_names):  # an identity unless every stage is kept
                x = self.final_act(x)
            if i in self.out_indices:
                maps.append(x)
        return maps
