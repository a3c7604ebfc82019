"""Paper Fig. 1 and Fig. 6: plain nets get worse as they get deeper; residual nets do not.

Plain and residual CIFAR-style nets of the scale's depths train with one recipe and one
budget. The figure has the paper's layout: plain on the left, residual on the right,
thin dashed lines the training error, bold lines the test error.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from ..recipes import CifarNet
from ..tables import format_table
from .common import (
    Context,
    Spread,
    SubRun,
    compare,
    ensure_seeds,
    precision_of,
    training_times,
    write_report,
)

# Paper Table 6, CIFAR-10 test error (%) of the residual nets; Fig. 6 gives the plain nets
# only as curves (plain-110 above 60%), so no plain numbers are quoted.
PAPER_RESNET_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}


def nets_for(depths: tuple[int, ...]) -> list[CifarNet]:
    """Shallowest and deepest first, so a partial run already answers the question."""
    order = [depths[0], depths[-1], *depths[1:-1]] if len(depths) > 1 else list(depths)
    return [CifarNet(d, plain=p) for d in order for p in (False, True)]


def final_train_error(run: SubRun, last: int = 5) -> float:
    """Mean training error of the last `last` logged windows (the curve's right end)."""
    errs = [r["train_error"] for r in run.records if r["kind"] == "train"][-last:]
    return sum(errs) / len(errs)


def curves(run: SubRun) -> tuple[list[int], list[float], list[int], list[float]]:
    train = [r for r in run.records if r["kind"] == "train"]
    test = [r for r in run.records if r["kind"] == "eval" and r.get("test_error") is not None]
    return ([r["iteration"] for r in train], [100 * r["train_error"] for r in train],
            [r["iteration"] for r in test], [100 * r["test_error"] for r in test])


def seed_band(runs: list[SubRun], part: int) -> tuple[list[int], np.ndarray]:
    """Iterations and the seeds' values (one row a seed) of a curve; part 0 train, 2 test."""
    cs = [curves(r) for r in runs]
    n = min(len(c[part]) for c in cs)  # seeds log the same iterations; guard a short one
    return [int(i) for i in cs[0][part][:n]], np.array([c[part + 1][:n] for c in cs])


def plot(runs: dict[CifarNet, list[SubRun]], depths: tuple[int, ...], path: Any,
         dataset: str) -> None:
    """Mean over seeds (training dashed, test bold), the seeds' range shaded."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colors = plt.get_cmap("viridis")([i / max(len(depths) - 1, 1) * 0.85
                                      for i in range(len(depths))])
    top = 0.0
    for ax, plain in zip(axes, (True, False), strict=True):
        for depth, color in zip(depths, colors, strict=True):
            seeds = runs[CifarNet(depth, plain=plain)]
            ti, te = seed_band(seeds, 0)
            vi, ve = seed_band(seeds, 2)
            ax.plot(ti, te.mean(0), "--", color=color, lw=0.8, alpha=0.8)
            ax.plot(vi, ve.mean(0), "-", color=color, lw=2.2,
                    label=f"{seeds[0].net.label}  {ve[:, -1].mean():.2f}%")
            if len(seeds) > 1:
                ax.fill_between(vi, ve.min(0), ve.max(0), color=color, alpha=0.2, lw=0)
            top = max(top, float(te.mean(0)[len(ti) // 5:].max(initial=0)))
        ax.set_title(f"{'plain' if plain else 'ResNet'} ({dataset})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(title="test error at the end" + (" (mean)" if len(seeds) > 1 else ""),
                  fontsize=8)
    axes[0].set_ylabel("error (%)   dashed: training, bold: test")
    axes[0].set_ylim(0, min(100, top * 1.15 + 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


COMPARED = {-1: "lower", 0: "not distinguishable", 1: "higher"}


def _effect(name: str, holds: bool, undecided: bool, numbers: str) -> str:
    state = ("**not distinguishable** (within the seeds' spread)" if undecided else
             "**reproduced**" if holds else "**not reproduced**")
    return f"- {name}: {state}. {numbers}"


def verdict(rows: dict[int, dict[str, Spread]], depths: tuple[int, ...]) -> list[str]:
    """The paper's effects (1)-(4), each reproduced, not reproduced or not distinguishable."""
    lo, hi = depths[0], depths[-1]
    a, b = rows[lo], rows[hi]
    plain_test, plain_train = compare(b["plain_test"], a["plain_test"]), \
        compare(b["plain_train"], a["plain_train"])
    res_test = compare(b["resnet_test"], a["resnet_test"])
    twins = {d: compare(rows[d]["resnet_test"], rows[d]["plain_test"]) for d in depths}
    return [
        _effect(f"(1) plain nets get worse with depth ({lo} -> {hi} layers)",
                plain_test == 1 and plain_train == 1, plain_test == 0 or plain_train == 0,
                f"Training error {b['plain_train'].pct()}% at {hi} against "
                f"{a['plain_train'].pct()}% at {lo} ({COMPARED[plain_train]}); test error "
                f"{b['plain_test'].pct()}% against {a['plain_test'].pct()}% "
                f"({COMPARED[plain_test]})."),
        _effect(f"(2) residual nets do not get worse with depth ({lo} -> {hi})",
                res_test != 1, False,
                f"Test error {b['resnet_test'].pct()}% at {hi} against "
                f"{a['resnet_test'].pct()}% at {lo} ({COMPARED[res_test]})."),
        _effect(f"(3) residual nets get better with depth ({lo} -> {hi}; paper Table 6: "
                f"{PAPER_RESNET_ERROR.get(lo, '—')}% -> {PAPER_RESNET_ERROR.get(hi, '—')}%)",
                res_test == -1, res_test == 0,
                f"Test error {b['resnet_test'].pct()}% against {a['resnet_test'].pct()}%."),
        _effect("(4) each residual net beats its plain twin", all(t == -1 for t in twins.values()),
                any(t == 0 for t in twins.values()) and not any(t == 1 for t in twins.values()),
                "; ".join(f"{d} layers: {rows[d]['resnet_test'].pct()}% against "
                          f"{rows[d]['plain_test'].pct()}% ({COMPARED[t]})"
                          for d, t in twins.items()) + "."),
    ]


def run(ctx: Context) -> dict[str, Any]:
    depths = ctx.scale.depths
    runs = ensure_seeds(ctx, nets_for(depths))
    folder = ctx.report_dir("degradation")
    rows: dict[int, dict[str, Spread]] = {}
    for d in depths:
        plain, res = runs[CifarNet(d, plain=True)], runs[CifarNet(d)]
        rows[d] = {"plain_train": Spread(tuple(final_train_error(r) for r in plain)),
                   "plain_test": Spread(tuple(r.test_error for r in plain)),
                   "resnet_train": Spread(tuple(final_train_error(r) for r in res)),
                   "resnet_test": Spread(tuple(r.test_error for r in res))}
    plot(runs, depths, folder / "degradation.png", ctx.scale.dataset)
    table = format_table(
        ["layers", "plain train", "plain test", "ResNet train", "ResNet test",
         "paper ResNet test (CIFAR-10)"],
        [[d, r["plain_train"].pct(), r["plain_test"].pct(), r["resnet_train"].pct(),
          r["resnet_test"].pct(), PAPER_RESNET_ERROR.get(d, "—")] for d, r in rows.items()],
        markdown=True)
    spread = (f" Each cell: mean ± standard deviation over {ctx.seeds} seeds, then every "
              "seed's number; the curves are the mean, shaded between the seeds' extremes. A "
              "difference within the sum of the two standard deviations is called not "
              "distinguishable." if ctx.seeds > 1 else
              " One seed: no spread is known, so small differences mean little.")
    body = ["![plain (left) and residual (right) nets: training and test error against "
            "iterations](degradation.png)", "",
            "Final errors (%). Training error: mean of the last five logged windows of the "
            "training batches (augmented, train mode, as the paper's thin curves); test error: "
            "the whole test split, single view." + spread, "", table, "",
            "The paper (Fig. 6, CIFAR-10, 64k iterations): plain nets' training and test error "
            "rise with depth (plain-110 above 60%); residual nets' fall with depth down to "
            "110 layers.", "", "## What came out", "", *verdict(rows, depths)]
    times, minutes = training_times(runs)
    if times:
        body += ["", times]
    errors = {str(d): {k: v.mean for k, v in r.items()} for d, r in rows.items()}
    per_seed = {str(d): {k: list(v.values) for k, v in r.items()} for d, r in rows.items()}
    write_report(folder, "Degradation: plain against residual nets (paper Fig. 1, Fig. 6)",
                 body, {"errors": errors, "per_seed": per_seed,
                        "train_minutes": minutes,
                        "runs": {n.label: [str(r.run_dir) for r in rs]
                                 for n, rs in runs.items()}}, ctx,
                 precision=precision_of(r for rs in runs.values() for r in rs))
    return errors
