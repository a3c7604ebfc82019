"""Deployment: the runtimes registry, BN folding, export, inference backends, prediction."""

from .backends import BACKENDS, Backend, load_backend
from .export import export
from .fold import fold_batchnorm
from .runtimes import FORMATS, RUNTIMES, ExportError, Runtime

__all__ = ["BACKENDS", "FORMATS", "RUNTIMES", "Backend", "ExportError", "Runtime", "export",
           "fold_batchnorm", "load_backend"]
