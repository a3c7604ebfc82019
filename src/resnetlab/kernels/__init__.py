"""Fused BatchNorm(+add)+ReLU for CPU training, from a small C file built on first use.

In a CPU training step of a CIFAR ResNet, BatchNorm, ReLU and the residual addition are
about a seventh of the time, all bound by memory traffic, and PyTorch runs them as separate
ops that read or write each activation about 13 times per BN-ReLU pair (forward and
backward). `bn_act` does a training-mode BN, the optional addition and the ReLU in about 8
(bn_act.c), on float32 activations or on bfloat16 ones (bf16 autocast, where they are
about half of the step's time; computed in float, rounded once). docs/performance.md has
what that gives. The C file is compiled once per
machine with the system's C compiler into kernels/ of the cache folder (resnetlab.files)
and linked to the OpenMP runtime PyTorch already loaded, so both share one thread pool.
Without a compiler, `available()` is False and callers use PyTorch's ops (same results to
float rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import TypeGuard

import torch
from torch import nn

from ..files import cache_dir

log = logging.getLogger(__name__)

_P, _I64, _D, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_SIGNATURES = {  # pointers pass as integer addresses (Tensor.data_ptr()) or None
    "bn_act_forward": [_P] * 6 + [_D, _D] + [_P] * 3 + [_I64, _I64, _INT],
    "bn_act_backward": [_P] * 11 + [_I64, _I64, _INT],
}
DTYPES = (torch.float32, torch.bfloat16)  # of the activations; parameters are float32


def _cpu_flags() -> str:
    # -march=native: the library is only valid on CPUs with the same instruction sets.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def _build(source: bytes, out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src, lib = Path(tmp) / "bn_act.c", Path(tmp) / out.name
        src.write_bytes(source)
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(src), "-o", str(lib),
               "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()}")
        os.replace(lib, out)  # atomic: a concurrent process sees the whole file or none


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    source = resources.files(__package__).joinpath("bn_act.c").read_bytes()
    key = hashlib.sha256(source + _cpu_flags().encode() + torch.__version__.encode()).hexdigest()
    path = cache_dir() / "kernels" / f"bn_act-{key[:16]}.so"
    try:
        if not path.exists():
            log.info("building the fused BN-ReLU kernels into %s", path)
            _build(source, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError) as e:
        log.warning("fused BN-ReLU kernels unavailable, using PyTorch's ops: %s", e)
        return None
    for name, args in _SIGNATURES.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def available() -> bool:
    """Whether the fused kernels are built and loaded (building them on first call)."""
    return _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# The kernels are torch.library custom ops with a registered backward and fake (meta)
# implementations, so autograd, torch.compile and torch.export see two ordinary ops,
# resnetlab::bn_act_forward and resnetlab::bn_act_backward, rather than opaque pointers.
# A functional op (autograd formulas need one): it returns the moved running statistics
# instead of writing them, and bn_act copies them into the BN's buffers.
@torch.library.custom_op("resnetlab::bn_act_forward", mutates_args=(), device_types="cpu")
def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
             running_mean: torch.Tensor, running_var: torch.Tensor, add: torch.Tensor | None,
             momentum: float, eps: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(relu(bn(x) + add), batch mean, batch 1/std, new running mean, new running var)."""
    c = x.shape[1]
    y = torch.empty_like(x)
    mean, invstd = weight.new_empty(c), weight.new_empty(c)
    new_mean, new_var = running_mean.clone(), running_var.clone()
    _library().bn_act_forward(  # type: ignore[union-attr]
        _ptr(x), _ptr(add), _ptr(weight), _ptr(bias), _ptr(new_mean), _ptr(new_var),
        momentum, eps, _ptr(y), _ptr(mean), _ptr(invstd), x.numel() // c, c,
        x.dtype == torch.bfloat16)
    return y, mean, invstd, new_mean, new_var


@_forward.register_fake
def _forward_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  running_mean: torch.Tensor, running_var: torch.Tensor,
                  add: torch.Tensor | None, momentum: float, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    c = x.shape[1]
    return (torch.empty_like(x), weight.new_empty(c), weight.new_empty(c),
            torch.empty_like(running_mean), torch.empty_like(running_var))


@torch.library.custom_op("resnetlab::bn_act_backward", mutates_args=(), device_types="cpu")
def _backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None,
              weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
              invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor]:
    """(dx, dweight, dbias, dadd); `y` is given only when there was an addition (its
    gradient is the masked `grad`, else an empty tensor)."""
    grad = grad.to(x.dtype).contiguous(memory_format=torch.channels_last)
    c = x.shape[1]
    dx = torch.empty_like(x)
    gm = torch.empty_like(x) if y is not None else x.new_empty(0)
    dweight, dbias = torch.empty_like(weight), torch.empty_like(bias)
    _library().bn_act_backward(  # type: ignore[union-attr]
        _ptr(grad), _ptr(x), _ptr(y), _ptr(weight), _ptr(bias), _ptr(mean), _ptr(invstd),
        _ptr(gm) if y is not None else None, _ptr(dx), _ptr(dweight), _ptr(dbias),
        x.numel() // c, c, x.dtype == torch.bfloat16)
    return dx, dweight, dbias, gm


@_backward.register_fake
def _backward_fake(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None,
                   weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                   invstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                  torch.Tensor]:
    gm = torch.empty_like(x) if y is not None else x.new_empty(0)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), gm


def _setup_context(ctx: torch.autograd.function.FunctionCtx,
                   inputs: tuple[torch.Tensor, ...], output: tuple[torch.Tensor, ...]) -> None:
    x, weight, bias, _, _, add = inputs[:6]
    y, mean, invstd, new_mean, new_var = output
    ctx.has_add = add is not None  # type: ignore[attr-defined]
    ctx.save_for_backward(x, y if add is not None else None, weight, bias, mean, invstd)
    ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)


def _autograd(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor,
              *_statistics: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    x, y, weight, bias, mean, invstd = ctx.saved_tensors  # type: ignore[attr-defined]
    # The backward op has no backward of its own: second derivatives raise, never lie.
    dx, dweight, dbias, gm = _backward(grad, x, y, weight, bias, mean, invstd)
    return (dx, dweight, dbias, None, None,
            gm if ctx.has_add else None, None, None)  # type: ignore[attr-defined]


_forward.register_autograd(_autograd, setup_context=_setup_context)


def usable(bn: nn.Module, x: torch.Tensor, add: torch.Tensor | None = None
           ) -> TypeGuard[nn.BatchNorm2d]:
    """Whether `bn_act` can stand in for `bn` on `x` (+ `add`): a plain training float32
    BatchNorm2d on a CPU float32 or bfloat16 channels_last batch, with no hooks to honour and
    the kernels built."""
    return (not torch.compiler.is_compiling()
            and type(bn) is nn.BatchNorm2d and bn.training and bn.affine
            and bn.track_running_stats and bn.momentum is not None
            and not (bn._forward_hooks or bn._forward_pre_hooks)
            and bn.weight.dtype == torch.float32
            and x.device.type == "cpu" and x.dtype in DTYPES and x.dim() == 4
            and x.shape[0] * x.shape[2] * x.shape[3] > 1
            and x.is_contiguous(memory_format=torch.channels_last)
            and (add is None or (add.shape == x.shape and add.dtype == x.dtype
                                 and add.device == x.device))
            and available())


def bn_act(bn: nn.BatchNorm2d, x: torch.Tensor, add: torch.Tensor | None = None
           ) -> torch.Tensor:
    """relu(bn(x) + add) for a training-mode `bn`, fused; the caller checks `usable` first."""
    if add is not None:
        add = add.contiguous(memory_format=torch.channels_last)
    if bn.num_batches_tracked is not None:  # always, given `usable`
        bn.num_batches_tracked.add_(1)
    assert bn.running_mean is not None and bn.running_var is not None  # given `usable`
    y, _, _, mean, var = _forward(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                  add, bn.momentum, bn.eps)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    return y
