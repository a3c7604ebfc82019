"""Deployment: BN folding, export to ONNX / OpenVINO / TorchScript, inference backends."""

from .backends import BACKENDS, Backend, load_backend
from .export import FORMATS, ExportError, export
from .fold import fold_batchnorm

__all__ = ["BACKENDS", "FORMATS", "Backend", "ExportError", "export", "fold_batchnorm",
           "load_backend"]
