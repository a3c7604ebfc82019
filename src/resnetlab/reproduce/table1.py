"""Paper Table 1 (ImageNet) and the CIFAR nets of Table 6, counted by the code."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt

from ..models.complexity import meta_model, model_summary, stage_table
from ..models.registry import PAPER_MACS
from ..tables import format_table
from .common import Context, write_report

# Paper Table 6, parameters of the CIFAR-10 nets (millions, as printed).
PAPER_CIFAR_PARAMS = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                      "resnet110": 1.7, "resnet1202": 19.4}


def run(ctx: Context) -> dict[str, Any]:
    folder = ctx.report_dir("table1")
    imagenet = {n: model_summary(n) for n in PAPER_MACS}
    cifar = {n: model_summary(n) for n in PAPER_CIFAR_PARAMS}
    stages = {n: [[r.name, "x".join(map(str, r.output)), r.blocks] for r in
                  stage_table(meta_model(n), 224)] for n in PAPER_MACS}
    names = list(PAPER_MACS)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [imagenet[n]["macs"] / 1e9 for n in names], 0.4,
           label="counted by resnetlab")
    ax.bar([x + 0.2 for x in xs], [PAPER_MACS[n] / 1e9 for n in names], 0.4,
           label="paper Table 1")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("multiply-adds at 224x224 (G)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "table1.png", dpi=120)
    plt.close(fig)
    worst = max(abs(imagenet[n]["macs"] - PAPER_MACS[n]) / PAPER_MACS[n] for n in names)
    rows = [[n, f"{s['params']:,}", f"{s['macs'] / 1e9:.2f}", f"{PAPER_MACS[n] / 1e9:.1f}"]
            for n, s in imagenet.items()]
    crows = [[n, f"{s['params']:,}", PAPER_CIFAR_PARAMS[n], f"{s['macs'] / 1e6:.1f}"]
             for n, s in cifar.items()]
    out_sizes = format_table(["stage", *names], [
        [stages[names[0]][i][0], *(f"{stages[n][i][1]} ({stages[n][i][2]} blocks)"
                                   if stages[n][i][2] else stages[n][i][1] for n in names)]
        for i in range(len(stages[names[0]]))], markdown=True)
    body = ["![multiply-adds, ours against the paper](table1.png)", "",
            "Multiply-adds are torch.utils.flop_counter's FLOPs halved (the paper's unit).", "",
            format_table(["model", "parameters", "mult-adds (G)", "paper (G)"], rows,
                         markdown=True), "",
            "Output of each stage at 224x224 (channels x height x width, blocks):", "",
            out_sizes, "",
            format_table(["CIFAR model", "parameters", "paper Table 6 (M)",
                          "mult-adds at 32 (M)"], crows, markdown=True), "",
            "## What came out", "",
            f"- Every ImageNet net's multiply-adds are within {100 * worst:.1f}% of the paper's "
            "(which prints two significant digits)."]
    results = {"imagenet": imagenet, "cifar": cifar}
    write_report(folder, "Architectures (paper Table 1)", body, results, ctx,
                 sizes="counted on the meta device, nothing trained (the same at every scale)",
                 precision=None)
    return results
