"""Deployment: the runtimes registry, BN folding, export, inference backends, prediction."""

from .backends import Backend, backend_names, load_backend
from .export import export
from .fold import fold_batchnorm
from .runtimes import RUNTIMES, ExportError, Runtime, formats, served

__all__ = ["RUNTIMES", "Backend", "ExportError", "Runtime", "backend_names", "export",
           "fold_batchnorm", "formats", "load_backend", "served"]
