"""Veit, Wilber, Belongie, Residual Networks Behave Like Ensembles of Relatively Shallow
Networks (NeurIPS 2016): deleting blocks at test time.

Deleting one residual block at test time leaves the block's shortcut in its place (for a
v1 block the input is already non-negative, so the final ReLU changes nothing), and barely
hurts a ResNet; deleting a block of the plain twin (possible where input and output shapes
agree) breaks the only path. Deleting k random blocks makes the error grow smoothly.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib.pyplot as plt
import torch
from torch import nn

from ..models.blocks import BasicBlock
from ..models.resnet import ResNet
from ..recipes import CifarNet
from ..tables import format_table
from .common import (
    TRAIN_SETS,
    Context,
    Scale,
    analysis_tensors,
    ensure_trained,
    error_rate,
    judged,
    pct,
    precision_of,
    write_report,
)


class Deleted(nn.Module):
    """A block with its residual branch removed: only the shortcut (identity if plain)."""

    def __init__(self, block: BasicBlock) -> None:
        super().__init__()
        self.shortcut = block.shortcut if block.shortcut is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x)


def blocks(model: ResNet) -> list[tuple[str, int, BasicBlock]]:
    """(stage name, index in stage, block) for every block, in forward order."""
    out = []
    for name, stage in zip(model.stage_names, model.stages, strict=True):
        for j, blk in enumerate(stage):
            if not isinstance(blk, BasicBlock):  # the study's CIFAR nets (paper sec. 4.2)
                raise TypeError(f"the lesion study takes v1 basic blocks, not {type(blk).__name__}")
            out.append((name, j, blk))
    return out


def deletable(block: BasicBlock) -> bool:
    """A residual block always is; a plain one only where its input and output shapes agree."""
    if block.shortcut is not None:
        return True
    return block.conv1.stride == (1, 1) and block.conv1.in_channels == block.bn2.num_features


def changes_shape(block: BasicBlock) -> bool:
    return block.conv1.stride != (1, 1) or block.conv1.in_channels != block.bn2.num_features


@contextlib.contextmanager
def delete(model: ResNet, which: Sequence[int]) -> Iterator[ResNet]:
    """Temporarily replace the blocks at flat indices `which` by their shortcuts."""
    table = blocks(model)
    saved = []
    for i in which:
        name, j, blk = table[i]
        stage = getattr(model, name)
        saved.append((stage, j, blk))
        stage[j] = Deleted(blk)
    try:
        yield model
    finally:
        for stage, j, blk in saved:
            stage[j] = blk


def single_deletions(model: ResNet, x: torch.Tensor, y: torch.Tensor) -> list[float | None]:
    out: list[float | None] = []
    for i, (_, _, blk) in enumerate(blocks(model)):
        if not deletable(blk):
            out.append(None)
            continue
        with delete(model, [i]):
            out.append(error_rate(model, x, y))
    return out


def k_deletions(model: ResNet, x: torch.Tensor, y: torch.Tensor, ks: Sequence[int],
                draws: int, seed: int = 0) -> dict[int, list[float]]:
    """Error after deleting k blocks drawn at random (`draws` draws per k)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(blocks(model))
    out: dict[int, list[float]] = {}
    for k in ks:
        out[k] = []
        for _ in range(draws):
            which = torch.randperm(n, generator=gen)[:k].tolist()
            with delete(model, which):
                out[k].append(error_rate(model, x, y))
    return out


def plot(res: dict[str, Any], path: Any) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    for r, style in ((res["resnet"], "-o"), (res["plain"], "--s")):
        idx = [i + 1 for i, e in enumerate(r["single"]) if e is not None]
        a.plot(idx, [100 * r["single"][i - 1] for i in idx], style, ms=3, label=r["label"])
        a.axhline(100 * r["baseline"], ls=":", lw=1, color=a.lines[-1].get_color())
    for i in res["resnet"]["downsampling"]:
        a.axvline(i + 1, color="grey", lw=0.6, alpha=0.5)
    a.set_xlabel("deleted block (grey: downsampling blocks)")
    a.set_ylabel("test error (%)   dotted: nothing deleted")
    a.set_title("deleting one block")
    a.legend(fontsize=8)
    ks = sorted(res["resnet"]["k"])
    vals = [res["resnet"]["k"][k] for k in ks]
    mean = [100 * sum(v) / len(v) for v in vals]
    std = [100 * float(torch.tensor(v).std()) if len(v) > 1 else 0.0 for v in vals]
    b.errorbar(ks, mean, yerr=std, fmt="-o", ms=3, capsize=2, label=res["resnet"]["label"])
    b.set_xlabel("number of blocks deleted at random")
    b.set_ylabel("test error (%), mean and std over draws")
    b.set_title("deleting k blocks")
    b.legend(fontsize=8)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _study(model: ResNet, label: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    table = blocks(model)
    return {"label": label, "baseline": error_rate(model, x, y),
            "names": [f"{s}.{j}" for s, j, _ in table],
            "downsampling": [i for i, (_, _, b) in enumerate(table) if changes_shape(b)],
            "single": single_deletions(model, x, y)}


BARELY = 0.1  # of the way from the net's error to chance's: "barely changes the error"


def verdict(r: dict[str, Any], p: dict[str, Any], chance: float) -> list[str]:
    """Veit et al.'s four claims (SPEC sec. 5): one deleted block barely changes a ResNet's
    error, downsampling blocks hurt most, a plain net's deleted block hurts far more, and
    the error grows smoothly with the number of blocks deleted."""
    down = set(r["downsampling"])
    rest = [e - r["baseline"] for i, e in enumerate(r["single"]) if i not in down]
    at_down = [r["single"][i] - r["baseline"] for i in down]
    plain = [e - p["baseline"] for e in p["single"] if e is not None]
    med = sorted(rest)[len(rest) // 2]
    barely = BARELY * (chance - r["baseline"])
    upper = sorted(rest)[(3 * len(rest)) // 4]  # the upper quartile of the other blocks
    mean_down = sum(at_down) / len(at_down)
    lines = [f"- {r['label']}: deleting one non-downsampling block changes the error by "
             f"{100 * med:+.2f} points (median of {len(rest)}; worst {100 * max(rest):+.2f}): "
             + ("**reproduced**" if med <= barely else "**not reproduced**")
             + f", one block barely matters (within {BARELY:g} of the way to chance's "
             f"{100 * chance:.0f}%: {100 * barely:.2f} points).",
             f"- A downsampling block changes it by {100 * mean_down:+.2f} points on average, "
             f"against {100 * upper:+.2f} for the upper quartile of the others: "
             + ("**reproduced**, downsampling blocks hurt most." if mean_down > upper else
                "**not reproduced**: downsampling blocks do not hurt most here.")]
    if plain:
        pm = sorted(plain)[len(plain) // 2]
        lines.append(f"- {p['label']}: deleting one block changes the error by "
                     f"{100 * pm:+.2f} points (median of {len(plain)} deletable blocks; "
                     f"baseline {pct(p['baseline'])}%).")
        lines.append("- The residual net is " + (
            "far more robust to a deleted block than its plain twin, as Veit et al. found."
            if med < pm / 2 else "not clearly more robust than its plain twin at this scale."))
    ks = sorted(r["k"])
    draws = [r["k"][k] for k in ks]
    means = [r["baseline"]] + [sum(d) / len(d) for d in draws]
    jumps = [b - a for a, b in itertools.pairwise(means)]
    # Smooth: no single extra deletion accounts for more than a third of the whole rise,
    # and no step down beyond twice the standard error of its draws' mean (draw noise).
    noise = [2 * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else 0.0
             for d in draws]
    dips = [-j for j, n in zip(jumps, noise, strict=True) if j < -n]
    smooth = max(jumps) <= max(means[-1] - means[0], 0) / 3 and not dips
    lines.append(f"- Deleting k = {ks[0]}..{ks[-1]} random blocks: mean error "
                 f"{pct(means[1])}% -> {pct(means[-1])}% (nothing deleted: "
                 f"{pct(means[0])}%); the largest step up between consecutive k is "
                 f"{100 * max(jumps):+.2f} points"
                 + (f", the largest step down {100 * max(dips):.2f}" if dips else "") + ": "
                 + ("**reproduced**, the error grows smoothly." if smooth else
                    "**not reproduced**: the error does not grow smoothly at this scale."))
    return lines


def nets(scale: Scale) -> list[CifarNet]:
    return [CifarNet(scale.lesion_depth), CifarNet(scale.lesion_depth, plain=True)]


def run(ctx: Context) -> dict[str, Any]:
    res_net, plain_net = nets(ctx.scale)
    runs = ensure_trained(ctx, [res_net, plain_net])
    x, y = analysis_tensors(ctx, res_net)
    ctx.say(f"lesion study on {len(y):,} test images")
    model = runs[res_net].model()
    r = _study(model, res_net.label, x, y)
    n = len(r["single"])
    r["k"] = k_deletions(model, x, y, list(range(1, max(2, n // 2) + 1)),
                         ctx.scale.lesion_draws)
    p = _study(runs[plain_net].model(), plain_net.label, x, y)
    folder = ctx.report_dir("lesion")
    results = {"images": len(y), "resnet": r, "plain": p}
    plot(results, folder / "lesion.png")
    rows = [[i + 1, name, "yes" if i in r["downsampling"] else "",
             pct(r["single"][i]), pct(p["single"][i])] for i, name in enumerate(r["names"])]
    body = ["![error after deleting one block (left) and k random blocks (right)](lesion.png)",
            "", f"{len(y):,} test images. Error with nothing deleted: {r['label']} "
            f"{pct(r['baseline'])}%, {p['label']} {pct(p['baseline'])}%. A plain block whose "
            "shapes change cannot be deleted (—).", "",
            format_table(["#", "block", "downsampling", f"{r['label']} error (%)",
                          f"{p['label']} error (%)"], rows, markdown=True), "",
            format_table(["k deleted", "mean error (%)", "draws"],
                         [[k, pct(sum(v) / len(v)), len(v)] for k, v in r["k"].items()],
                         markdown=True), "",
            "Veit et al. 2016: deleting one residual block barely changes the error, except "
            "the downsampling blocks, which hurt most; deleting a layer of a plain "
            "(VGG-style) net sends it to chance; the error grows smoothly with the number of "
            "blocks deleted.",
            "", "## What came out", "",
            *judged(runs.values(), ctx.scale.dataset,
                    lambda: verdict(r, p, TRAIN_SETS[ctx.scale.dataset].chance_error))]
    write_report(folder, "Lesion study (Veit et al. 2016)", body, results, ctx,
                 precision=precision_of(runs.values()), first_seed_only=True)
    return results
