"""`resnetlab reproduce EXPERIMENT`: the paper's experiments, one command each.

Each experiment trains the networks it needs as ordinary sub-runs (shared between
experiments, resumable, never trained twice), measures, and writes a folder with PNG
figures, report.md (ours beside the paper's numbers, and whether the effect appeared) and
the raw numbers in results.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from . import degradation, gradients, lesion, preact, responses, shortcuts, table1
from .common import SCALES, Context, get_scale

log = logging.getLogger(__name__)

EXPERIMENTS: dict[str, tuple[Callable[[Context], Any], str]] = {
    "degradation": (degradation.run, "plain vs residual nets by depth (Fig. 1, Fig. 6)"),
    "shortcuts": (shortcuts.run, "shortcut options A, B, C (Table 3)"),
    "responses": (responses.run, "std of layer responses (Fig. 7)"),
    "lesion": (lesion.run, "delete blocks at test time (Veit et al.)"),
    "preact": (preact.run, "v1 against pre-activation v2"),
    "gradients": (gradients.run, "gradient norm per layer, plain vs residual"),
    "table1": (table1.run, "architectures, parameters, mult-adds (Table 1)"),
}


def run_experiment(name: str, scale: str = "cpu", out: str | Path | None = None,
                   data_dir: str | None = None, sets: Sequence[str] = (),
                   progress: bool | None = None, seeds: int = 1, jobs: int = 1) -> Path:
    """Run one experiment (training what it lacks); returns its report folder. `seeds`:
    sub-runs per network where an experiment compares errors (degradation, shortcuts,
    preact; the analyses use seed 0). `jobs`: sub-runs trained at once, in processes."""
    for flag, value in (("--seeds", seeds), ("--jobs", jobs)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    sc = get_scale(scale)
    root = Path(out) if out is not None else Path("runs") / "reproduce" / sc.name
    ctx = Context(sc, root, data_dir, tuple(sets), progress, seeds=seeds, jobs=jobs)
    EXPERIMENTS[name][0](ctx)
    return ctx.report_dir(name)


__all__ = ["EXPERIMENTS", "SCALES", "run_experiment"]
