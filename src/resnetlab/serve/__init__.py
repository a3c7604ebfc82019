"""`resnetlab serve`: trained ResNets as an HTTP service (docs/serving.md)."""

from .app import Metrics, build_app
from .batcher import Batcher, Overloaded
from .model import ServedModel, best_batch

__all__ = ["Batcher", "Metrics", "Overloaded", "ServedModel", "best_batch", "build_app"]
