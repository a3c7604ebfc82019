"""State-dict conversion between resnetlab's ResNets and torchvision's, timm's (resnet,
resnetv2) and akamaster's CIFAR ResNets, both ways.

With torchvision only the stem, the shortcut and the head are named differently; blocks match
one to one. Its bottleneck nets put the stride on the 3x3 (v1.5), so they pair with our `b`
variants (`resnet50b`, ...); resnet18/34 pair with ours directly.
"""

from __future__ import annotations

import re

import torch

from ..errors import WeightsError

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
    """A torchvision resnet state_dict, renamed for the matching resnetlab model.

    torchvision's `resnet18`/`resnet34` match ours of the same name; its
    `resnet50/101/152` are v1.5, our `resnet50b/101b/152b`. The tensors are the same
    objects; only the keys change (`conv1` becomes `stem.conv`, `downsample.0/1`
    `shortcut.conv/bn`, `fc` `head.fc`).

    Args:
        state: a torchvision ResNet's `state_dict()`.

    Returns:
        The same tensors under resnetlab's names.

    Examples:
        >>> import resnetlab, torchvision
        >>> tv = torchvision.models.resnet18()
        >>> ours = resnetlab.create_model("resnet18")
        >>> ours.load_state_dict(resnetlab.from_torchvision(tv.state_dict()))
        <All keys matched successfully>
    """
    return _rename(state, _TV_TO_OURS)


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A resnetlab state_dict renamed for torchvision: the inverse of `from_torchvision`.

    Args:
        state: the `state_dict()` of a model torchvision has: the 7x7 stem, shortcut
            option B, no pre-activation (`resnet18`, `resnet34`, `resnet50b`, ...).

    Returns:
        The same tensors under torchvision's names.

    Examples:
        >>> import resnetlab, torchvision
        >>> ours = resnetlab.create_model("resnet50b")
        >>> tv = torchvision.models.resnet50()
        >>> tv.load_state_dict(resnetlab.to_torchvision(ours.state_dict()))
        <All keys matched successfully>
    """
    return _rename(state, _OURS_TO_TV)


# timm's `resnet` family names its layers as torchvision does, except the deep stem of the
# C/D variants (conv1 is a Sequential) and D's shortcut, whose downsample.0 is the average
# pool (no parameters), so its conv and BN are downsample.1 and .2.
_TIMM_STEM = [("conv1.0.", "stem.conv1."), ("conv1.1.", "stem.bn1."), ("conv1.3.", "stem.conv2."),
              ("conv1.4.", "stem.bn2."), ("conv1.6.", "stem.conv3.")]
_TIMM_AVG_DOWN = [("BLOCK.downsample.1.", "BLOCK.shortcut.conv."),
                  ("BLOCK.downsample.2.", "BLOCK.shortcut.bn.")]
# timm's `resnetv2` (pre-activation): stages.<i>.blocks.<j> with norm<k>/conv<k>, a final
# norm and a 1x1-conv classifier.
_TIMM_V2 = [(r"^stages\.(\d+)\.blocks\.(\d+)\.norm(\d)\.", r"layer{i}.\2.bn\3."),
            (r"^stages\.(\d+)\.blocks\.(\d+)\.conv(\d)\.", r"layer{i}.\2.conv\3."),
            (r"^stages\.(\d+)\.blocks\.(\d+)\.downsample\.conv\.", r"layer{i}.\2.shortcut.conv."),
            (r"^norm\.", "final_act.0.")]


def is_timm_v2(state: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("stages.0.blocks.") for k in state)


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm `resnet*` (incl. C/D variants) or `resnetv2_*` state_dict, renamed for the
    resnetlab model of the same architecture (resnet50d, preact_resnet50, ...)."""
    if is_timm_v2(state):
        out = {}
        for key, value in state.items():
            for pattern, repl in _TIMM_V2:
                m = re.match(pattern, key)
                if m:
                    stage = str(int(m.group(1)) + 1) if m.groups() else ""
                    key = re.sub(pattern, repl.replace("{i}", stage), key)
                    break
            if key == "head.fc.weight" and value.dim() == 4:  # 1x1 conv -> Linear
                value = value.flatten(1)
            out[key] = value
        return out
    avg_down = any(re.search(r"downsample\.2\.", k) for k in state)
    rules = [_rule(t, o) for t, o in _TIMM_STEM + (_TIMM_AVG_DOWN if avg_down else [])]
    return _rename(_rename(state, rules), _TV_TO_OURS)


def to_timm(state: dict[str, torch.Tensor], preact: bool = False,
            avg_down: bool = False) -> dict[str, torch.Tensor]:
    """A resnetlab state_dict renamed for timm: `resnet*` (deep stem and ResNet-D's
    avg_down shortcut as their state says and `avg_down` tells), or with `preact` for
    `resnetv2_*`."""
    if preact:
        out = {}
        for key, value in state.items():
            m = re.match(r"^layer(\d+)\.(\d+)\.(bn|conv|shortcut\.conv)(\d?)\.(.*)$", key)
            if m:
                i, j, kind, k, rest = m.groups()
                name = {"bn": f"norm{k}", "conv": f"conv{k}",
                        "shortcut.conv": "downsample.conv"}[kind]
                key = f"stages.{int(i) - 1}.blocks.{j}.{name}.{rest}"
            elif key.startswith("final_act.0."):
                key = "norm." + key[len("final_act.0."):]
            elif key == "head.fc.weight":
                value = value[:, :, None, None]
            out[key] = value
        return out
    rules = [_rule(o, t) for t, o in _TIMM_STEM + (_TIMM_AVG_DOWN if avg_down else [])]
    return _rename(_rename(state, rules), _OURS_TO_TV)


# akamaster/pytorch_resnet_cifar10 (the well-known CIFAR reproduction): torchvision-like
# names with `linear` for the classifier, and an option-A shortcut that pads its new zero
# channels on both sides (out/4 each) where ours appends them. The identity channels thus
# sit at other indices of the residual stream, so every tensor that writes or reads the
# stream is permuted, not just renamed.
_AKAMASTER = [("conv1.", "stem.conv."), ("bn1.", "stem.bn."), ("linear.", "head.fc.")]


# akamaster's trainer saves `model.state_dict()` of an nn.DataParallel: every key begins so.
_DATA_PARALLEL = "module."


def unwrap_data_parallel(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without DataParallel's `module.` key prefixes (a plain state as it is)."""
    return {k.removeprefix(_DATA_PARALLEL): v for k, v in state.items()}


def is_akamaster(state: dict[str, torch.Tensor]) -> bool:
    keys = unwrap_data_parallel(state)
    return "linear.weight" in keys and "layer1.0.conv1.weight" in keys


def _stream_perms(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Where in akamaster's channel order each of our residual-stream channels is: the
    permutation of each block's input ("<block>.in") and output ("<block>.out") stream,
    and of the classifier's input ("head"). `state` is in our names."""
    found = (re.match(r"^layer(\d+)\.(\d+)\.conv1\.weight$", k) for k in state)
    blocks = sorted((int(m.group(1)), int(m.group(2))) for m in found if m)
    perm = torch.arange(state["stem.conv.weight"].shape[0])
    perms: dict[str, torch.Tensor] = {}
    for stage, j in blocks:
        name = f"layer{stage}.{j}"
        perms[name + ".in"] = perm
        out = state[f"{name}.conv2.weight"].shape[0]
        if out != len(perm):  # option A: theirs pads out/4 zeros on each side, ours appends
            q, width = out // 4, len(perm)
            rest = [c for c in range(out) if not q <= c < q + width]
            perm = torch.cat([q + perm, torch.tensor(rest)])
        perms[name + ".out"] = perm
    perms["head"] = perm
    return perms


def _akamaster_axes(key: str) -> tuple[str, int] | None:
    """Which stream permutation applies to a tensor (our name), and along which dim."""
    m = re.match(r"^(layer\d+\.\d+)\.(conv1|conv2|bn2)\.", key)
    if m:
        block, layer = m.groups()
        return (block + ".in", 1) if layer == "conv1" else (block + ".out", 0)
    if key.startswith(("stem.", "head.fc.weight")) and not key.endswith("num_batches_tracked"):
        return ("head", 1) if key.startswith("head") else ("stem", 0)
    return None


def _permute_akamaster(state: dict[str, torch.Tensor], inverse: bool) -> dict[str, torch.Tensor]:
    perms = _stream_perms(state)
    perms["stem"] = torch.arange(state["stem.conv.weight"].shape[0])
    out = {}
    for key, value in state.items():
        axes = _akamaster_axes(key)
        if axes is not None and value.dim() > 0:
            perm = perms[axes[0]]
            if inverse:  # ours -> theirs: their channel perm[o] is our channel o
                value = torch.empty_like(value).index_copy_(axes[1], perm, value)
            else:
                value = value.index_select(axes[1], perm)
        out[key] = value
    return out


def from_akamaster(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An akamaster CIFAR ResNet state_dict, as its trainer saves it (`checkpoint
    ["state_dict"]`, DataParallel's `module.` prefixes and all) or without the prefixes, for
    the resnetlab model of the same depth (resnet20 .. resnet1202, option A)."""
    if not is_akamaster(state):
        raise WeightsError("not an akamaster CIFAR ResNet state_dict (it has no linear.weight "
                           "and layer1.0.conv1.weight): pass checkpoint['state_dict'] of "
                           "pytorch_resnet_cifar10's trainer")
    renamed = _rename(unwrap_data_parallel(state), [_rule(a, o) for a, o in _AKAMASTER])
    return _permute_akamaster(renamed, inverse=False)


def to_akamaster(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A resnetlab CIFAR ResNet (option A) state_dict in akamaster's names and order."""
    return _rename(_permute_akamaster(state, inverse=True),
                   [_rule(o, a) for a, o in _AKAMASTER])
