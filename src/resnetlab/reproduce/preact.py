"""Identity Mappings (v2): pre-activation blocks against the original v1 blocks.

v2 moves BN and ReLU before each conv, so the shortcut path carries the signal with
nothing applied after the addition; it trains more easily, more so the deeper the net.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ..recipes import CifarNet
from ..tables import format_table
from .common import (
    Context,
    Scale,
    Spread,
    compare,
    ensure_seeds,
    judged,
    precision_of,
    training_times,
    write_report,
)
from .degradation import seed_band

# He et al., Identity Mappings in Deep Residual Networks (ECCV 2016), Tables 2-3: CIFAR-10
# test error (%).
PAPER = "ResNet-164 v1 5.93%, v2 5.46%; ResNet-1001 v2 4.62%"


def verdict(errs: dict[int, tuple[Spread, Spread]]) -> list[str]:
    """Effect (7): pre-activation helps, and more so at greater depth. A gain is v1's
    error minus v2's, paired by seed."""
    gains = {d: Spread(tuple(a - b for a, b in zip(v1.values, v2.values, strict=True)))
             for d, (v1, v2) in errs.items()}
    lines = [f"- {d} layers: v1 {v1.pct()}%, v2 {v2.pct()}%: v2 "
             + {-1: "is better, as in Identity Mappings.", 0: "is not distinguishable from v1.",
                1: "is **worse** at this scale."}[compare(v2, v1)]
             for d, (v1, v2) in errs.items()]
    if len(gains) > 1:
        lo, hi = min(gains), max(gains)
        more = compare(gains[hi], gains[lo])
        state = {1: "**reproduced**", 0: "**not distinguishable** (within the seeds' spread)",
                 -1: "**not reproduced**"}[more]
        lines.append(f"- (7) pre-activation helps more at greater depth: {state}. Gain "
                     f"(v1 − v2 error) {gains[hi].pct()} points at {hi} layers against "
                     f"{gains[lo].pct()} at {lo}.")
    return lines


def nets(scale: Scale) -> list[CifarNet]:
    return [CifarNet(d, preact=p) for d in scale.pair_depths for p in (False, True)]


def run(ctx: Context) -> dict[str, Any]:
    depths = ctx.scale.pair_depths
    trained = nets(ctx.scale)
    runs = ensure_seeds(ctx, trained)
    folder = ctx.report_dir("preact")
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in trained:
        vi, ve = seed_band(runs[n], 2)
        line = ax.plot(vi, ve.mean(0), "-" if n.preact else "--",
                       label=f"{n.label}  {ve[:, -1].mean():.2f}%")
        if len(runs[n]) > 1:
            ax.fill_between(vi, ve.min(0), ve.max(0), color=line[0].get_color(), alpha=0.2,
                            lw=0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "preact.png", dpi=120)
    plt.close(fig)
    def spread(d: int, preact: bool) -> Spread:
        return Spread(tuple(r.test_error for r in runs[CifarNet(d, preact=preact)]))

    errs = {d: (spread(d, False), spread(d, True)) for d in depths}
    body = ["![test error of v1 (dashed) and v2 (solid) nets](preact.png)", "",
            format_table(["layers", "v1 test error (%)", "v2 (pre-activation) test error (%)"],
                         [[d, a.pct(), b.pct()] for d, (a, b) in errs.items()],
                         markdown=True), "",
            f"Identity Mappings (CIFAR-10): {PAPER}.", "", "## What came out", "",
            *judged((r for rs in runs.values() for r in rs), ctx.scale.dataset,
                    lambda: verdict(errs))]
    times, minutes = training_times(runs)
    body += ["", times] if times else []
    results: dict[str, Any] = {
        str(d): {"v1": a.mean, "v2": b.mean, "v1_per_seed": list(a.values),
                 "v2_per_seed": list(b.values)} for d, (a, b) in errs.items()}
    results["train_minutes"] = minutes
    write_report(folder, "Pre-activation (v2) against v1", body, results, ctx,
                 precision=precision_of(r for rs in runs.values() for r in rs))
    return results
