"""Paper Table 3: shortcut options A (zero-pad), B (project where shapes change), C (always).

The paper compares them on ImageNet ResNet-34; here they are three variants of one
CIFAR-style net trained with one recipe, so the parameter cost of B and C is visible
beside the error they buy.
"""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ..models.complexity import count_params
from ..tables import format_table
from ..train.recipes import CifarNet
from .common import Context, ensure_trained, pct, write_report
from .degradation import curves

# Paper Table 3, ImageNet ResNet-34, 10-crop top-1 / top-5 error (%).
PAPER_TABLE3 = {"A": (25.03, 7.76), "B": (24.52, 7.46), "C": (24.19, 7.40)}
OPTIONS = ("A", "B", "C")


def plot(runs: dict[str, Any], params: dict[str, int], path: Any) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for opt in OPTIONS:
        _, _, vi, ve = curves(runs[opt])
        a.plot(vi, ve, "-o", ms=3, label=f"option {opt}")
    a.set_xlabel("iteration")
    a.set_ylabel("test error (%)")
    a.grid(alpha=0.3)
    a.legend()
    bars = b.bar(OPTIONS, [100 * runs[o].test_error for o in OPTIONS], color="tab:blue")
    b.bar_label(bars, labels=[f"{params[o] / 1e3:.0f}K params" for o in OPTIONS], fontsize=8)
    b.set_ylabel("final test error (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.scale.shortcut_depth
    nets = {o: CifarNet(d, shortcut=o) for o in OPTIONS}
    done = ensure_trained(ctx, list(nets.values()))
    runs = {o: done[n] for o, n in nets.items()}
    params = {o: count_params(runs[o].model()) for o in OPTIONS}
    folder = ctx.report_dir("shortcuts")
    plot(runs, params, folder / "shortcuts.png")
    errs = {o: runs[o].test_error for o in OPTIONS}
    rows = [[o, f"{params[o]:,}", pct(errs[o]), *PAPER_TABLE3[o]] for o in OPTIONS]
    order = sorted(OPTIONS, key=lambda o: errs[o])
    spread = max(errs.values()) - min(errs.values())
    body = ["![test error of options A, B, C](shortcuts.png)", "",
            format_table([f"option (resnet{d})", "parameters", "test error (%)",
                      "paper ResNet-34 top-1", "paper top-5"], rows, markdown=True), "",
            "The paper: B is slightly better than A (A's zero-padded channels learn no "
            "residual), C marginally better than B (its extra parameters), and the "
            "differences are small: projections are not essential to the degradation fix.", "",
            "## What came out", "",
            f"- Ranking by test error: {' < '.join(order)} (best first); spread "
            f"{100 * spread:.2f} points. "
            + ("Same order as the paper (C < B < A)." if order == ["C", "B", "A"] else
               "Not the paper's order (C < B < A)."),
            f"- B costs {params['B'] - params['A']:,} parameters over A, C "
            f"{params['C'] - params['A']:,}."]
    write_report(folder, "Shortcut options A, B, C (paper Table 3)", body,
                 {"test_error": errs, "params": params}, ctx.scale)
    return {"test_error": errs, "params": params}
