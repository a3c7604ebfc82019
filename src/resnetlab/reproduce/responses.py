"""Paper Fig. 7: standard deviation of the layer responses of plain and residual nets.

A response is the output of a 3x3 layer after its BN and before the ReLU or the addition
(for a v1 block: `bn1` and `bn2`, and the stem's BN). Its std is taken over every value
the layer produces on the analysis images (batch, channels and positions pooled). The
paper's reading: residual functions are closer to zero than the unreferenced functions of
plain nets, and more so in deeper ResNets (sec. 4.2).
"""

from __future__ import annotations

import itertools
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from ..recipes import CifarNet
from ..tables import format_table
from .common import (
    Context,
    Scale,
    analysis_tensors,
    ensure_trained,
    judged,
    precision_of,
    write_report,
)


def response_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BNs that follow 3x3 convs, in forward order (shortcut projections excluded)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and "shortcut" not in n]


@torch.inference_mode()
def response_stds(model: nn.Module, x: torch.Tensor, batch: int = 500) -> list[float]:
    """Std of each response layer's output over `x` (float64 running sums, one pass)."""
    layers = response_layers(model)
    sums = torch.zeros(len(layers), 3, dtype=torch.float64)  # count, sum, sum of squares

    def hook(i: int) -> Any:
        def fn(_: nn.Module, __: Any, out: torch.Tensor) -> None:
            o = out.double()
            sums[i] += torch.stack([torch.tensor(o.numel(), dtype=torch.float64), o.sum(),
                                    (o * o).sum()])
        return fn

    handles = [m.register_forward_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    model.eval()
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    n, s, ss = sums.unbind(1)
    mean = s / n
    return (ss / n - mean * mean).clamp_min(0).sqrt().tolist()


def plot(stds: dict[str, list[float]], path: Any) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7))
    for label, values in stds.items():
        style = "--" if label.startswith("plain") else "-"
        top.plot(range(1, len(values) + 1), values, style, lw=1.4, label=label)
        bottom.plot(range(1, len(values) + 1), sorted(values, reverse=True), style, lw=1.4,
                    label=label)
    top.set_xlabel("layer index (original order)")
    bottom.set_xlabel("layer index (sorted by magnitude)")
    for ax in (top, bottom):
        ax.set_ylabel("std of response")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def nets(scale: Scale) -> list[CifarNet]:
    return [CifarNet(d, plain=p) for d in scale.response_depths for p in (True, False)]


def run(ctx: Context) -> dict[str, Any]:
    depths = ctx.scale.response_depths
    trained = nets(ctx.scale)
    runs = ensure_trained(ctx, trained)
    x, _ = analysis_tensors(ctx, trained[0])
    stds = {n.label: response_stds(runs[n].model(), x) for n in trained}
    mean = {k: sum(v) / len(v) for k, v in stds.items()}
    folder = ctx.report_dir("responses")
    plot(stds, folder / "responses.png")
    rows = [[n.label, len(stds[n.label]), f"{mean[n.label]:.3f}",
             f"{min(stds[n.label]):.3f}", f"{max(stds[n.label]):.3f}"] for n in trained]
    lines = []
    for d in depths:
        p, r = mean[f"plain{d}"], mean[f"resnet{d}"]
        lines.append(f"- {d} layers: mean response std {r:.3f} (ResNet) against {p:.3f} (plain): "
                     + ("smaller in the residual net, as in the paper." if r < p else
                        "**not** smaller in the residual net, unlike the paper."))
    res = [mean[f"resnet{d}"] for d in depths]
    shrinks = all(a > b for a, b in itertools.pairwise(res))
    lines.append(f"- ResNets from {depths[0]} to {depths[-1]} layers: mean std "
                 + " -> ".join(f"{v:.3f}" for v in res) + ": "
                 + ("smaller with depth, as in the paper." if shrinks else
                    "**not** smaller with depth at this scale, unlike the paper."))
    body = ["![std of each layer's response: layer order (top), sorted (bottom); dashed: "
            "plain](responses.png)", "",
            f"Responses of the trained nets on the first {len(x):,} test images. Layers: the "
            "stem's 3x3 and both 3x3s of every block, after BN, before ReLU/addition; a "
            "layer's response std is taken over all its outputs (images, channels and "
            "positions together).", "",
            format_table(["net", "layers", "mean std", "min", "max"], rows, markdown=True), "",
            "The paper (Fig. 7, CIFAR-10): ResNets' responses are generally smaller than "
            "their plain counterparts', and the deeper ResNet has the smaller responses.", "",
            "## What came out", "", *judged(runs.values(), ctx.scale.dataset, lambda: lines)]
    write_report(folder, "Layer responses (paper Fig. 7)", body,
                 {"images": len(x), "stds": stds, "mean_std": mean}, ctx,
                 precision=precision_of(runs.values()), first_seed_only=True)
    return {"mean_std": mean}
