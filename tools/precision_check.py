"""Issue 17's gate before reproduce may train in bf16: one net, 3 seeds in each precision.

fp32's sub-runs are `reproduce degradation --scale short`'s own (reused where finished,
trained where not); bf16's are the same recipe with `precision=bf16`, in their own root.
The report says whether the two means differ by more than the seeds' spread, and what each
sub-run's training took, on this CPU.

    python tools/precision_check.py [--net 20] [--seeds 3] [--jobs 2] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from pathlib import Path

from resnetlab.precision import cpu_name, this_cpu
from resnetlab.recipes import CifarNet
from resnetlab.reproduce.common import Context, Spread, compare, ensure_seeds, get_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", type=int, default=20, help="depth of the CIFAR ResNet (6n+2)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--scale", default="short")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs", type=Path, default=Path("runs/reproduce"))
    ap.add_argument("--report", type=Path, default=Path("docs/results/precision"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    scale, net = get_scale(args.scale), CifarNet(args.net)
    spreads, minutes = {}, {}
    for precision, root in (("fp32", args.runs / scale.name),
                            ("bf16", args.runs / f"{scale.name}-bf16")):
        sets = () if precision == "fp32" else ("precision=bf16",)
        ctx = Context(scale, root, args.data_dir, sets, seeds=args.seeds, jobs=args.jobs)
        runs = ensure_seeds(ctx, [net])[net]
        recorded = {r.precision for r in runs}
        if recorded != {precision}:
            raise SystemExit(f"{root}: sub-runs trained in {recorded}, expected {precision}")
        spreads[precision] = Spread(tuple(r.test_error for r in runs))
        minutes[precision] = [r.seconds / 60 for r in runs if r.seconds is not None]
    fp32, bf16 = spreads["fp32"], spreads["bf16"]
    same = compare(bf16, fp32) == 0
    cpu = this_cpu()
    verdict = ("**not distinguishable**: the means differ by "
               f"{100 * abs(bf16.mean - fp32.mean):.2f} points, within the seeds' spread "
               f"({100 * (bf16.std + fp32.std):.2f}, the sum of the two standard deviations)"
               if same else
               f"**distinguishable**: the means differ by {100 * abs(bf16.mean - fp32.mean):.2f}"
               f" points, more than the seeds' spread ({100 * (bf16.std + fp32.std):.2f})")
    speed = " ".join(f"{p} {statistics.fmean(m):.1f} min per sub-run (each: "
                     f"{', '.join(f'{x:.1f}' for x in m)})." for p, m in minutes.items() if m)
    lines = [
        f"# bf16 against fp32 training: {net.label} at --scale {scale.name}, "
        f"{args.seeds} seeds", "",
        f"CPU: {cpu_name()} ({cpu.kind}), {args.jobs} sub-runs at a time. "
        f"Made by `python tools/precision_check.py --net {args.net} --seeds {args.seeds} "
        f"--jobs {args.jobs}`.", "",
        "| precision | test error (%), mean ± std (each seed) |", "|---|---|",
        f"| fp32 | {fp32.pct()} |", f"| bf16 (autocast) | {bf16.pct()} |", "",
        f"- Final test error, bf16 against fp32: {verdict}.",
        f"- Training time as each sub-run recorded it: {speed}", ""]
    args.report.mkdir(parents=True, exist_ok=True)
    (args.report / "report.md").write_text("\n".join(lines))
    (args.report / "results.json").write_text(json.dumps(
        {"net": net.label, "scale": scale.name, "cpu": cpu_name(), "cpu_kind": cpu.kind,
         "jobs": args.jobs, "test_error": {p: list(s.values) for p, s in spreads.items()},
         "train_minutes": minutes, "distinguishable": not same}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
