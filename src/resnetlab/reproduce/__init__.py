"""`resnetlab reproduce EXPERIMENT`: the paper's experiments, one command each.

Each experiment trains the networks it needs as ordinary sub-runs (shared between
experiments, resumable, never trained twice), measures, and writes a folder with PNG
figures, report.md (ours beside the paper's numbers, and whether the effect appeared) and
the raw numbers in results.json.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ClusterConfig
from ..errors import ConfigError
from ..recipes import CifarNet
from . import degradation, gradients, lesion, preact, responses, shortcuts, table1
from .common import (
    REFERENCE_CPU,
    SCALES,
    Context,
    Scale,
    get_scale,
    park_sub_runs,
    plan,
    sub_run_states,
)

log = logging.getLogger(__name__)


def _no_sub_runs(scale: Scale) -> list[CifarNet]:
    return []


@dataclass(frozen=True)
class Experiment:
    """One experiment: how it runs, one line on what it shows, and the sub-runs it trains at
    a scale (one seed's; finished ones are shared with the other experiments)."""

    run: Callable[[Context], Any]
    summary: str
    nets: Callable[[Scale], list[CifarNet]] = _no_sub_runs
    seeded: bool = False  # --seeds N trains N sub-runs of each net

    def plan(self, scale: Scale, seeds: int = 1) -> str:
        """'4 sub-runs (resnet20, resnet56, plain20, plain56), about 65 min' at this scale."""
        nets = self.nets(scale) * (seeds if self.seeded else 1)
        if not nets:
            return "no sub-runs"
        labels = ", ".join(dict.fromkeys(n.label for n in nets))
        minutes = scale.minutes(nets)
        time = ("under a minute" if minutes < 1 else f"about {minutes:.0f} min" if minutes < 90
                else f"about {minutes / 60:.1f} h")
        return f"{len(nets)} sub-run{'s' if len(nets) > 1 else ''} ({labels}), {time}"


EXPERIMENTS: dict[str, Experiment] = {
    "degradation": Experiment(degradation.run, "plain vs residual nets by depth (Fig. 1, Fig. 6)",
                              degradation.nets, seeded=True),
    "shortcuts": Experiment(shortcuts.run, "shortcut options A, B, C (Table 3)",
                            shortcuts.nets, seeded=True),
    "responses": Experiment(responses.run, "std of layer responses (Fig. 7)", responses.nets),
    "lesion": Experiment(lesion.run, "delete blocks at test time (Veit et al.)", lesion.nets),
    "preact": Experiment(preact.run, "v1 against pre-activation v2", preact.nets, seeded=True),
    "gradients": Experiment(gradients.run, "gradient norm per layer, plain vs residual"),
    "table1": Experiment(table1.run, "architectures, parameters, mult-adds (Table 1)"),
}


def _context(name: str, scale: str, out: str | Path | None, data_dir: str | None,
             sets: Sequence[str], progress: bool | None, seeds: int, jobs: int,
             archive: str | Path | None, plain_seeds: int | None,
             cluster: ClusterConfig | None) -> Context:
    for flag, value in (("--seeds", seeds), ("--jobs", jobs)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    sc = get_scale(scale)
    root = Path(out) if out is not None else Path("runs") / "reproduce" / sc.name
    return Context(sc, root, data_dir, tuple(sets), progress, seeds=seeds, jobs=jobs,
                   archive=None if archive is None else Path(archive), plain_seeds=plain_seeds,
                   cluster=cluster)


def run_experiment(name: str, scale: str = "cpu", out: str | Path | None = None,
                   data_dir: str | None = None, sets: Sequence[str] = (),
                   progress: bool | None = None, seeds: int = 1, jobs: int = 1,
                   archive: str | Path | None = None, plain_seeds: int | None = None,
                   cluster: ClusterConfig | None = None) -> Path:
    """Run one experiment (training what it lacks); returns its report folder. `seeds`:
    sub-runs per network where an experiment compares errors (degradation, shortcuts,
    preact; the analyses use seed 0), and `plain_seeds` (at most `seeds`) per plain
    network where it differs. `jobs`: sub-runs trained at once, in processes; `cluster`:
    each sub-run a submitit job instead (`--executor`, resnetlab.cluster).
    `archive`: a folder of finished sub-runs' logs, read instead of training them again and
    added to (reproduce.common's doc)."""
    ctx = _context(name, scale, out, data_dir, sets, progress, seeds, jobs, archive,
                   plain_seeds, cluster)
    EXPERIMENTS[name].run(ctx)
    return ctx.report_dir(name)


def experiment_status(name: str, scale: str = "cpu", out: str | Path | None = None,
                      data_dir: str | None = None, sets: Sequence[str] = (), seeds: int = 1,
                      archive: str | Path | None = None, plain_seeds: int | None = None
                      ) -> list[tuple[str, str]]:
    """(sub-run, where it stands) for each sub-run the experiment trains with these
    arguments, without training or waiting (`reproduce EXPERIMENT --status`)."""
    ctx = _context(name, scale, out, data_dir, sets, None, seeds, 1, archive, plain_seeds,
                   None)
    exp = EXPERIMENTS[name]
    return sub_run_states(ctx, exp.nets(ctx.scale), None if exp.seeded else 1)


def park_experiment(name: str, scale: str, archive: str | Path, out: str | Path | None = None,
                    data_dir: str | None = None, sets: Sequence[str] = (), seeds: int = 1,
                    plain_seeds: int | None = None) -> list[tuple[str, str]]:
    """(sub-run, what happened) as each unfinished sub-run's latest checkpoint is parked in
    `archive` for the next machine (`reproduce EXPERIMENT --park`; reproduce.archive); it
    may run beside the training."""
    ctx = _context(name, scale, out, data_dir, sets, None, seeds, 1, archive, plain_seeds,
                   None)
    exp = EXPERIMENTS[name]
    return park_sub_runs(ctx, plan(ctx, exp.nets(ctx.scale), None if exp.seeded else 1))


__all__ = ["EXPERIMENTS", "REFERENCE_CPU", "SCALES", "Experiment", "experiment_status",
           "park_experiment", "run_experiment"]
