"""Paper Table 3: shortcut options A (zero-pad), B (project where shapes change), C (always).

The paper compares them on ImageNet ResNet-34; here they are three variants of one
CIFAR-style net trained with one recipe, so the parameter cost of B and C is visible
beside the error they buy.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ..models.complexity import count_params
from ..recipes import CifarNet
from ..tables import format_table
from .common import (
    Context,
    Scale,
    Spread,
    SubRun,
    compare,
    ensure_seeds,
    judged,
    precision_of,
    training_times,
    write_report,
)
from .degradation import COMPARED, seed_band

# Paper Table 3, ImageNet ResNet-34, 10-crop top-1 / top-5 error (%).
PAPER_TABLE3 = {"A": (25.03, 7.76), "B": (24.52, 7.46), "C": (24.19, 7.40)}
OPTIONS = ("A", "B", "C")


def plot(runs: dict[str, list[SubRun]], errs: dict[str, Spread], params: dict[str, int],
         path: Any) -> None:
    """Mean test curve of each option (seeds' range shaded), and the final errors."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for opt in OPTIONS:
        vi, ve = seed_band(runs[opt], 2)
        a.plot(vi, ve.mean(0), "-", label=f"option {opt}")
        if len(runs[opt]) > 1:
            a.fill_between(vi, ve.min(0), ve.max(0), alpha=0.2, lw=0)
    a.set_xlabel("iteration")
    a.set_ylabel("test error (%)")
    a.grid(alpha=0.3)
    a.legend()
    bars = b.bar(OPTIONS, [100 * errs[o].mean for o in OPTIONS], color="tab:blue",
                 yerr=[100 * errs[o].std for o in OPTIONS], capsize=4)
    b.bar_label(bars, labels=[f"{params[o] / 1e3:.0f}K params" for o in OPTIONS], fontsize=8,
                label_type="center", color="white")
    b.set_ylabel("final test error (%)" + (", mean ± std" if len(runs["A"]) > 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PAPER_GAP = (25.03 - 24.19) / 25.03  # Table 3, ResNet-34 top-1: A against C, of A's error


def verdict(errs: dict[str, Spread]) -> list[str]:
    """Effect (6): A, B and C close, C slightly the best (paper Table 3)."""
    means = {o: 100 * e.mean for o, e in errs.items()}
    gap = max(means.values()) - min(means.values())
    pairs = {f"{x}/{y}": compare(errs[x], errs[y]) for x, y in (("A", "B"), ("A", "C"),
                                                                 ("B", "C"))}
    best = min(OPTIONS, key=lambda o: errs[o].mean)
    c_vs = [compare(errs["C"], errs[o]) for o in ("A", "B")]
    # Table 3's spread relative to its error (0.84 points of 25.03%), at this error level:
    # a fixed 1 point was ImageNet's scale, loose for an error of a few percent.
    bar = PAPER_GAP * sum(means.values()) / len(means)
    close_state = ("**reproduced**" if gap <= bar else
                   "**not distinguishable** (within the seeds' spread)"
                   if all(v == 0 for v in pairs.values()) else "**not reproduced**")
    c_state = ("**reproduced**" if c_vs == [-1, -1] else
               "**not distinguishable** (within the seeds' spread)"
               if best == "C" or (0 in c_vs and 1 not in c_vs) else "**not reproduced**")
    return [
        "- (6a) the options are close (paper: 0.84 points between A and C on ImageNet, "
        f"{100 * PAPER_GAP:.1f}% of the error; here {bar:.2f} points): " + close_state
        + f". Means {', '.join(f'{o} {means[o]:.2f}%' for o in OPTIONS)}: {gap:.2f} points "
        f"apart; pairs {', '.join(f'{k} {COMPARED[v]}' for k, v in pairs.items())}.",
        f"- (6b) C is slightly the best: {c_state}. Lowest mean: {best}.",
    ]


def nets(scale: Scale) -> list[CifarNet]:
    return [CifarNet(scale.shortcut_depth, shortcut=o) for o in OPTIONS]


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.scale.shortcut_depth
    by_option = dict(zip(OPTIONS, nets(ctx.scale), strict=True))
    done = ensure_seeds(ctx, list(by_option.values()))
    runs = {o: done[n] for o, n in by_option.items()}
    params = {o: count_params(runs[o][0].architecture(ctx.scale.dataset)) for o in OPTIONS}
    errs = {o: Spread(tuple(r.test_error for r in runs[o])) for o in OPTIONS}
    folder = ctx.report_dir("shortcuts")
    plot(runs, errs, params, folder / "shortcuts.png")
    rows = [[o, f"{params[o]:,}", errs[o].pct(), *PAPER_TABLE3[o]] for o in OPTIONS]
    body = ["![test error of options A, B, C](shortcuts.png)", "",
            format_table([f"option (resnet{d})", "parameters", "test error (%)",
                          "paper ResNet-34 top-1", "paper top-5"], rows, markdown=True), "",
            "The paper: B is slightly better than A (A's zero-padded channels learn no "
            "residual), C marginally better than B (its extra parameters), and the "
            "differences are small: projections are not essential to the degradation fix.", "",
            "## What came out", "",
            *judged((r for rs in runs.values() for r in rs), ctx.scale.dataset,
                    lambda: verdict(errs)),
            f"- B costs {params['B'] - params['A']:,} parameters over A, C "
            f"{params['C'] - params['A']:,}."]
    times, minutes = training_times(done)
    body += ["", times] if times else []
    results = {"test_error": {o: e.mean for o, e in errs.items()},
               "per_seed": {o: list(e.values) for o, e in errs.items()}, "params": params,
               "train_minutes": minutes}
    write_report(folder, "Shortcut options A, B, C (paper Table 3)", body, results, ctx,
                 precision=precision_of(r for rs in runs.values() for r in rs))
    return results
