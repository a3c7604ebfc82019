"""Fine-tuning: start a run from pretrained weights (`train --init SOURCE`), freeze parts of
the net, train the backbone at a lower lr than the new classifier.

SOURCE is a resnetlab weights directory or run, a torchvision or timm checkpoint file
(`.pth`/`.pt`/`.bin`, read with weights_only=True so no pickled code runs, or
`.safetensors`), a Hugging Face Hub style folder (timm's config.json + model.safetensors),
or an akamaster CIFAR checkpoint. Its format is told by its keys, and the architecture they
describe must be the one the config builds; only the classifier (another class count) and
a grayscale first conv (summed over RGB) may differ, each said in one log line.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..config import frozen_parts
from ..errors import ConfigError, UnknownModelError, WeightsError
from ..models.config import CONFIG_FILE, WEIGHTS_FILE
from ..models.convert import (
    from_akamaster,
    from_timm,
    is_akamaster,
    is_timm_v2,
    unwrap_data_parallel,
)
from ..models.factory import check_state_dict
from ..models.registry import get_spec
from ..models.resnet import ResNet
from ..runs import RunDir

log = logging.getLogger(__name__)

HEAD = ("head.fc.weight", "head.fc.bias")
FIRST_CONVS = ("stem.conv.weight", "stem.conv1.weight")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped from a training checkpoint's mapping and
    DataParallel's `module.` prefixes."""
    try:
        if path.suffix == ".safetensors":
            obj: object = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise WeightsError(f"{path} is refused: it holds Python objects beyond tensors, and "
                           "no code from a checkpoint is run (torch.load weights_only)") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError) as e:
        raise WeightsError(f"{path} is not a readable checkpoint (weights only): "
                           f"{' '.join(str(e).split())[:200]}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state_dict (a mapping of names to tensors)")
    return unwrap_data_parallel(obj)


def _blocks(keys: list[str], pattern: str) -> list[int]:
    """Blocks per stage, from keys matching `pattern` with (stage, block) groups."""
    found = [tuple(map(int, m.groups())) for k in keys if (m := re.match(pattern, k))]
    stages = sorted({s for s, _ in found})
    return [1 + max(b for s2, b in found if s2 == s) for s in stages]


def _known(name: str) -> str | None:
    try:
        return get_spec(name).name
    except UnknownModelError:
        return None


def _architecture(raw: dict[str, torch.Tensor], fmt: str) -> str | None:
    """The registered model a foreign state_dict is, where its keys tell."""
    keys = list(raw)
    per = _blocks(keys, r"^layer(\d+)\.(\d+)\.conv1\.")
    if fmt == "akamaster":
        return _known(f"resnet{6 * per[0] + 2}")
    if fmt == "timm-resnetv2":
        per = _blocks(keys, r"^stages\.(\d+)\.blocks\.(\d+)\.conv1\.")
        bottleneck = any(".conv3." in k for k in keys)
        return _known(f"preact_resnet{sum(per) * (3 if bottleneck else 2) + 2}")
    bottleneck = "layer1.0.conv3.weight" in raw
    deep = "conv1.0.weight" in raw
    avg_down = any(".downsample.2." in k for k in keys)
    # torchvision's and timm's bottleneck nets stride on the 3x3: our `b` (v1.5) and up.
    tweak = "d" if avg_down else "c" if deep else "b" if bottleneck else ""
    return _known(f"resnet{sum(per) * (3 if bottleneck else 2) + 2}{tweak}")


def read_source(source: str | Path) -> tuple[dict[str, torch.Tensor], str, str | None]:
    """(the state_dict in resnetlab's names, its format, the architecture it holds if told)."""
    path = Path(source)
    if not path.exists():
        raise WeightsError(f"{path} does not exist; --init takes a weights directory, a run, "
                           "a .pth/.safetensors file or a Hugging Face style folder")
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            path = RunDir(path).weights() or path
        try:
            meta = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, ValueError) as e:
            raise WeightsError(f"{path} holds no readable {CONFIG_FILE} ({e}); give a "
                               "weights directory, a run or a checkpoint file") from None
        raw = _read_file(path / WEIGHTS_FILE)
        if isinstance(meta, dict) and "format_version" in meta:
            return raw, "resnetlab", _known(str(meta.get("architecture")))
    else:
        raw = _read_file(path)
    if "head.fc.weight" in raw and any(k.startswith("stem.") for k in raw) and \
            not is_timm_v2(raw):
        return raw, "resnetlab", None
    if is_akamaster(raw):
        return from_akamaster(raw), "akamaster", _architecture(raw, "akamaster")
    if is_timm_v2(raw):
        return from_timm(raw), "timm-resnetv2", _architecture(raw, "timm-resnetv2")
    if "fc.weight" in raw and any(k.startswith("conv1.") for k in raw):
        return from_timm(raw), "torchvision/timm", _architecture(raw, "torchvision/timm")
    raise WeightsError(f"{source}: keys of no known ResNet layout (first: {next(iter(raw), '-')}"
                       "); resnetlab reads resnetlab, torchvision, timm and akamaster weights")


def init_from(model: ResNet, source: str | Path, name: str) -> None:
    """Load SOURCE into `model` (built as the registered `name`): everything exact but a
    classifier for another class count (left as initialised) and a 1-channel first conv
    from an RGB one (the sum of its three input channels: the same response to gray)."""
    state, fmt, arch = read_source(source)
    if arch is not None and arch != name:
        raise ConfigError(f"{source} holds a {arch} ({fmt} weights), but the config builds a "
                          f"{name}; set model.name={arch}")
    own = model.state_dict()
    if any(k in state and (k not in own or state[k].shape != own[k].shape) for k in HEAD):
        log.info("classifier re-initialised: %s has %d classes, this data %d", source,
                 state["head.fc.weight"].shape[0], model.num_classes)
        state = {k: v for k, v in state.items() if k not in HEAD}
        state.update({k: own[k] for k in HEAD if k in own})
    for k in FIRST_CONVS:
        if k in state and k in own and state[k].shape[1] == 3 and own[k].shape[1] == 1:
            log.info("first conv: %s's RGB filters summed for 1-channel input", source)
            state[k] = state[k].sum(1, keepdim=True)
    check_state_dict(model, state, str(source))
    model.load_state_dict(state)
    log.info("initialised from %s (%s weights, %d tensors)", source, fmt, len(state))


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm of a frozen part: in eval mode whatever mode the model is put in, so it
    normalises with, and keeps, the pretrained running statistics. Same state_dict."""

    def train(self, mode: bool = True) -> FrozenBatchNorm2d:
        return super().train(False)


def freeze(model: ResNet, spec: str) -> list[str]:
    """No gradients for the parts named in `spec`, and their BatchNorms in eval mode."""
    parts = frozen_parts(spec, model.stage_names)
    for name in parts:
        module = getattr(model, name)
        module.requires_grad_(False)
        for m in module.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = FrozenBatchNorm2d
        module.train(model.training)
    if parts:
        log.info("frozen: %s", ", ".join(parts))
    return parts
