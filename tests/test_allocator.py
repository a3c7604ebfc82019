"""allocator.keep_freed_memory: freed activations stay in the process instead of being
mmap'd and unmapped, or trimmed off the heap, at every step.

The setting is process-wide and cannot be undone, so each side runs in its own interpreter.
The probe asks glibc where a block lands, not how many page faults a training step takes:
fault counts depend on the kernel and its transparent huge pages, the allocator's
placement does not. Torch is not imported there, so the heap holds no holes that a probe
block could land in. (The step's faults and time are benchmark figures: docs/performance.md.)
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import ctypes, ctypes.util, importlib.util, sys
spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])
allocator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(allocator)
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
if sys.argv[1] == "keep":
    assert allocator.keep_freed_memory()
# 2 MiB of 100 KiB blocks freed at the heap's top: trimmed above glibc's 128 KiB default.
blocks = [libc.malloc(100 << 10) for _ in range(20)]
top = libc.sbrk(0)
for b in reversed(blocks):
    libc.free(b)
trimmed = libc.sbrk(0) < top
# A 4 MiB block (an activation): mmap'd above the default threshold, else on the heap.
big = libc.malloc(4 << 20)
print(big + (4 << 20) <= libc.sbrk(0), trimmed)
"""


def _probe(mode: str) -> tuple[bool, bool]:
    spec = importlib.util.find_spec("resnetlab")  # finds the package without importing it
    assert spec is not None and spec.origin is not None
    source = Path(spec.origin).parent / "train" / "allocator.py"
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(source)], capture_output=True,
                         text=True, check=True, timeout=60)
    on_heap, trimmed = out.stdout.split()
    return on_heap == "True", trimmed == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_stay_on_the_heap_once_the_thresholds_are_raised() -> None:
    assert _probe("default") == (False, True)  # mmap'd, and the freed top trimmed
    assert _probe("keep") == (True, False)
