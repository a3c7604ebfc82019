"""resnetlab: deep residual networks (He et al., CVPR 2016) and their follow-ups."""

from .errors import ConfigError, ResNetLabError, UnknownModelError, WeightsError
from .models import ResNet, cifar_resnet, list_models
from .models.complexity import count_params, model_summary, stage_table
from .models.config import ModelConfig
from .models.convert import from_torchvision, to_torchvision
from .models.factory import (
    create_features,
    create_model,
    load_model,
    load_weights,
    save_weights,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ModelConfig", "ResNet", "ResNetLabError", "UnknownModelError",
    "WeightsError", "cifar_resnet", "count_params", "create_features", "create_model",
    "from_torchvision", "list_models", "load_model", "load_weights", "model_summary",
    "save_weights", "stage_table", "to_torchvision",
]
