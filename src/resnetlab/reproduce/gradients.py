"""Seed 002's argument made visible: d(x + F(x))/dx = 1 + F'(x).

Through a residual block the gradient keeps a term of 1, so it reaches the first layers
undiminished however deep the net; through a plain stack it is a product of layer
Jacobians and can shrink or grow with depth. Measured as the norm of each conv weight's
gradient, in forward order, on one fixed training batch: at initialisation and after
the scale's first training steps (the paper's recipe, lr 0.1).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from ..data import build_data
from ..models.factory import create_model
from ..recipes import CifarNet
from ..tables import format_table
from ..train.loop import make_optimizer, train_step
from .common import Context, write_report


def conv_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Gradient norm of every conv weight (forward order) for the loss on (x, y)."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    norms = [float(m.weight.grad.norm()) if m.weight.grad is not None else 0.0
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "shortcut" not in n]
    model.zero_grad(set_to_none=True)
    return norms


def measure(ctx: Context, net: CifarNet) -> dict[str, list[float]]:
    cfg = ctx.config(net)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.batch_size, cfg.eval_batch_size, cfg.seed,
                      channels_last=False)
    model = create_model(cfg.model.name, num_classes=len(data.classes), in_chans=data.in_chans,
                         **cfg.model.options)
    batches = iter(data.train.batches(0))
    probe = next(batches)  # the fixed batch every measurement uses
    model.train()
    out = {"init": conv_grad_norms(model, *probe)}
    opt, crit = make_optimizer(model, cfg), nn.CrossEntropyLoss()
    for step in range(ctx.scale.gradient_steps):
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(data.train.batches(step))
            xb, yb = next(batches)
        train_step(model, opt, crit, xb, yb, cfg, contextlib.nullcontext())
    out["trained"] = conv_grad_norms(model, *probe)
    return out


def spread(norms: list[float]) -> float:
    """Orders of magnitude between the largest and smallest layer gradient."""
    return math.log10(max(norms) / max(min(norms), 1e-30))


def run(ctx: Context) -> dict[str, Any]:
    d, steps = ctx.scale.gradient_depth, ctx.scale.gradient_steps
    nets = [CifarNet(d, plain=True), CifarNet(d)]
    res = {}
    for n in nets:
        ctx.say(f"gradients of {n.label}: at initialisation and after {steps} steps")
        res[n.label] = measure(ctx, n)
    folder = ctx.report_dir("gradients")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, when, title in zip(axes, ("init", "trained"),
                               ("at initialisation", f"after {steps} steps"), strict=True):
        for label, r in res.items():
            ax.semilogy(range(1, len(r[when]) + 1), r[when],
                        "--" if label.startswith("plain") else "-", label=label)
        ax.set_title(title)
        ax.set_xlabel("conv layer (input side on the left)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("gradient norm of the layer's weights")
    fig.tight_layout()
    fig.savefig(folder / "gradients.png", dpi=120)
    plt.close(fig)
    rows, lines = [], []
    for when in ("init", "trained"):
        for label, r in res.items():
            g = r[when]
            rows.append([label, when, f"{g[0]:.3g}", f"{g[-1]:.3g}", f"{g[0] / g[-1]:.3g}",
                         f"{spread(g):.2f}"])
        p, q = res[nets[0].label][when], res[nets[1].label][when]
        flatter = spread(q) < spread(p)
        lines.append(f"- {when}: layer gradients span {spread(q):.2f} orders of magnitude in "
                     f"{nets[1].label} against {spread(p):.2f} in {nets[0].label}: "
                     + ("flatter with shortcuts, as the +1 argument predicts." if flatter else
                        "**not** flatter with shortcuts here."))
    body = ["![gradient norm per conv layer, plain dashed](gradients.png)", "",
            format_table(["net", "when", "first layer", "last layer", "first / last",
                      "spread (log10 max/min)"], rows, markdown=True), "",
            "Seed 002: a residual block's derivative is 1 + F'(x), so the gradient of the "
            "loss reaches early layers through the identity terms; a plain net multiplies "
            "the layer Jacobians, which can vanish or explode with depth (BN keeps the "
            "forward signal normalised, but not the product of Jacobians).", "",
            "## What came out", "", *lines]
    cfg = ctx.config(nets[0])
    write_report(folder, "Gradient norms per layer: plain against residual", body, res,
                 ctx, sizes=f"{ctx.scale.dataset}, {d}-layer nets, one probe batch of "
                 f"{cfg.batch_size}, {steps} training steps at lr {cfg.optim.lr}")
    return res
