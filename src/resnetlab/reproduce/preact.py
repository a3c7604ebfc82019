"""Identity Mappings (v2): pre-activation blocks against the original v1 blocks.

v2 moves BN and ReLU before each conv, so the shortcut path carries the signal with
nothing applied after the addition; it trains more easily, more so the deeper the net.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ..tables import format_table
from ..train.recipes import CifarNet
from .common import Context, ensure_trained, pct, write_report
from .degradation import curves

# He et al., Identity Mappings in Deep Residual Networks (ECCV 2016), Tables 2-3: CIFAR-10
# test error (%).
PAPER = "ResNet-164 v1 5.93%, v2 5.46%; ResNet-1001 v2 4.62%"


def run(ctx: Context) -> dict[str, Any]:
    depths = ctx.scale.pair_depths
    nets = [CifarNet(d, preact=p) for d in depths for p in (False, True)]
    runs = ensure_trained(ctx, nets)
    folder = ctx.report_dir("preact")
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in nets:
        _, _, vi, ve = curves(runs[n])
        ax.plot(vi, ve, "-o" if n.preact else "--s", ms=3,
                label=f"{n.label}  {ve[-1]:.2f}%")
    ax.set_xlabel("iteration")
    ax.set_ylabel("test error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "preact.png", dpi=120)
    plt.close(fig)
    errs = {d: (runs[CifarNet(d)].test_error, runs[CifarNet(d, preact=True)].test_error)
            for d in depths}
    lines = [f"- {d} layers: v1 {pct(v1)}%, v2 {pct(v2)}%: "
             + ("v2 is better, as in Identity Mappings." if v2 < v1 else
                "v2 is **not** better at this scale.") for d, (v1, v2) in errs.items()]
    body = ["![test error of v1 (dashed) and v2 (solid) nets](preact.png)", "",
            format_table(["layers", "v1 test error (%)", "v2 (pre-activation) test error (%)"],
                     [[d, pct(a), pct(b)] for d, (a, b) in errs.items()], markdown=True), "",
            f"Identity Mappings (CIFAR-10): {PAPER}.", "", "## What came out", "", *lines]
    results = {str(d): {"v1": a, "v2": b} for d, (a, b) in errs.items()}
    write_report(folder, "Pre-activation (v2) against v1", body, results, ctx.scale)
    return results
