"""Where resnetlab keeps what it downloads or builds: $RESNETLAB_CACHE, else ~/.cache/resnetlab."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("RESNETLAB_CACHE", Path.home() / ".cache" / "resnetlab"))
