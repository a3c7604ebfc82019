"""The ResNet family: building pieces, the parameterised network and the named-model table."""

from .blocks import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck
from .factory import cifar_resnet
from .layers import Projection, ZeroPadShortcut
from .registry import MODELS, ModelSpec, get_spec, list_models
from .resnet import ResNet

__all__ = [
    "MODELS", "BasicBlock", "Bottleneck", "ModelSpec", "PreActBasicBlock", "PreActBottleneck",
    "Projection", "ResNet", "ZeroPadShortcut", "cifar_resnet", "get_spec", "list_models",
]
