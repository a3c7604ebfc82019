"""resnetlab: deep residual networks (He et al., CVPR 2016) and their follow-ups."""

from .complexity import count_params, model_summary, stage_table
from .convert import from_torchvision, to_torchvision
from .errors import ConfigError, ResNetLabError, UnknownModelError, WeightsError
from .factory import ModelConfig, create_model, load_model, load_weights, save_weights
from .models import ResNet, cifar_resnet, list_models

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelConfig", "ResNet", "ResNetLabError", "UnknownModelError",
    "WeightsError", "cifar_resnet", "count_params", "create_model", "from_torchvision",
    "list_models", "load_model", "load_weights", "model_summary", "save_weights",
    "stage_table", "to_torchvision",
]
