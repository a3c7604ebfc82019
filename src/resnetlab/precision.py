"""Which numerics this machine runs natively, and the one place that decides `auto`.

bf16 pays only where the hardware multiplies bf16 itself: AMX (Xeon Sapphire Rapids and
later) or AVX512-BF16 (Cooper Lake, AMD Zen 4). Elsewhere oneDNN emulates it: measured on
an AMX machine with its ISA capped at AVX2, a 64-channel 3x3 convolution took 556 ms in
bf16 against 82 ms in fp32, so `auto` must never pick bf16 there. int8 pays with VNNI
(AVX512-VNNI, AVX-VNNI) or AMX-INT8. Runtimes pick a reduced precision by themselves on
such CPUs (OpenVINO compiles in bf16 by default), so every caller states one explicitly.

`ONEDNN_MAX_CPU_ISA` (oneDNN's cap, used to emulate an older CPU) is honoured: a cap below
the ISA a precision needs makes that precision not native, for every runtime.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError

TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
INFER_PRECISIONS = ("auto", "fp32", "bf16", "int8")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")

# oneDNN's ISA names in increasing order; AVX2_VNNI* sit below AVX512_CORE but carry VNNI.
_ONEDNN_ORDER = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                 "AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512",
                 "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX512_CORE_AMX_FP16",
                 "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2")


@dataclass(frozen=True)
class CPU:
    """The facts about a CPU that decide its precisions."""

    model: str
    flags: frozenset[str]  # the subset of FLAGS this CPU has
    onednn_cap: str = ""  # ONEDNN_MAX_CPU_ISA, upper-cased; "" when unset

    def _cap_allows(self, isa: str) -> bool:
        cap = self.onednn_cap
        if cap in ("", "ALL", "DEFAULT"):
            return True
        if cap not in _ONEDNN_ORDER:
            return False  # an unknown cap: assume the worst, stay on fp32
        if isa == "VNNI":
            return cap in ("AVX2_VNNI", "AVX2_VNNI_2") or \
                _ONEDNN_ORDER.index(cap) >= _ONEDNN_ORDER.index("AVX512_CORE_VNNI")
        return _ONEDNN_ORDER.index(cap) >= _ONEDNN_ORDER.index(isa)

    @property
    def native_bf16(self) -> bool:
        return bool(self.flags & {"amx_bf16", "avx512_bf16"}) and \
            self._cap_allows("AVX512_CORE_BF16")

    @property
    def native_int8(self) -> bool:
        return bool(self.flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) and \
            self._cap_allows("VNNI")

    @property
    def kind(self) -> str:
        """A short name for tables: amx, avx512-bf16, avx512, avx2 or other."""
        if self.native_bf16:
            return "amx" if "amx_bf16" in self.flags else "avx512-bf16"
        if self.onednn_cap and not self._cap_allows("AVX512_CORE"):
            return "avx2" if self._cap_allows("AVX2") else "other"
        return "avx512" if "avx512f" in self.flags else "avx2" if "avx2" in self.flags \
            else "other"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; empty where there is none."""
    info: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def _read_cpuinfo() -> tuple[str, set[str]]:
    info = _cpuinfo()
    return (info.get("model name") or platform.processor() or platform.machine(),
            set(info.get("flags", "").split()))


@functools.cache
def cpu_name() -> str:
    """This CPU's model name with its family and model numbers (an "AMD EPYC" alone says
    little: Zen 2 and Zen 4 share it)."""
    info = _cpuinfo()
    model = info.get("model name") or platform.processor() or platform.machine()
    fam, mod = info.get("cpu family"), info.get("model")
    return f"{model} (family {fam} model {mod})" if fam and mod else model


def device_name(device: torch.device) -> str:
    """What a run trained on, as its eval.json records it: reports made from sub-runs of
    several machines name each one's CPU (precision kind and threads) or GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()}, {this_cpu().kind}, {torch.get_num_threads()} threads"


@functools.cache
def this_cpu() -> CPU:
    """This machine's CPU: /proc/cpuinfo, else PyTorch's cpuinfo (other systems)."""
    model, flags = _read_cpuinfo()
    if not flags:
        caps = torch.backends.cpu.get_capabilities() if hasattr(torch.backends.cpu,
                                                                 "get_capabilities") else {}
        flags = {k.replace("avx512_f", "avx512f") for k, v in caps.items() if v is True}
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # torch's own word (its oneDNN)
        flags -= {"amx_bf16", "avx512_bf16"}
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", ""))
    return CPU(model, frozenset(flags & set(FLAGS)), cap.strip().upper())


@dataclass(frozen=True)
class Choice:
    precision: str  # fp32 | bf16 | int8
    reason: str


def train_precision(requested: str, device: torch.device, cpu: CPU | None = None) -> Choice:
    """What `precision=requested` trains in on `device` (autocast dtype or fp32), and why."""
    if requested not in TRAIN_PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(TRAIN_PRECISIONS)}, "
                          f"got {requested!r}")
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
        where = f"CUDA device {torch.cuda.get_device_name(device)}"
    else:
        cpu = cpu or this_cpu()
        native = cpu.native_bf16
        where = f"CPU {cpu.model} ({cpu.kind})"
    if requested != "auto":
        slow = requested == "bf16" and not native
        return Choice(requested, "asked for" + ("; bf16 is emulated on this device, slower "
                                                "than fp32" if slow else ""))
    if native:
        return Choice("bf16", f"auto: bf16 autocast runs natively on the {where}")
    return Choice("fp32", f"auto: the {where} has no native bf16")


def infer_candidates(offered: Sequence[str], cpu: CPU | None = None) -> list[str]:
    """Of the precisions a runtime `offered`, those `auto` may try, fastest first: int8
    and bf16 only where this CPU runs them natively (each still needs its agreement check
    to pass before it is used), then fp32."""
    cpu = cpu or this_cpu()
    native = {"int8": cpu.native_int8, "bf16": cpu.native_bf16}
    return [*(p for p in ("int8", "bf16") if p in offered and native[p]), "fp32"]
