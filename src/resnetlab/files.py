"""Where resnetlab keeps what it downloads or builds, and how it writes files that must
survive a kill: $RESNETLAB_CACHE, else ~/.cache/resnetlab; write_atomic."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("RESNETLAB_CACHE", Path.home() / ".cache" / "resnetlab"))


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would, for a moment, for every
    thread); 0o022 where /proc does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over `path`.
    The file gets the mode an ordinary write would give it (mkstemp's is owner-only, which
    would hide a run's files from the group on a shared cluster)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # name the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """`path.write_text(text)`, whole or not at all (write_atomic)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
