"""Issue 33's pilot: how long must a schedule be for deeper residual nets to reach a lower
training error (sec. 4.2)? One seed's curves of training error against epochs.

Reads the finished sub-runs of `resnetlab reproduce degradation --scale SCALE` (residual nets,
and the plain twins where finished; seed 0 and any further seeds) and writes pilot.md and
pilot.png: the training error of each net at a few epochs (moving mean of 5 logged windows),
its final training and test error, time and speed, and the epoch from which the deepest
ResNet's training error stays below the shallowest's.

    python tools/pilot_curves.py [--scale long] [--out runs/reproduce/long] \\
        [--report docs/results/degradation-<scale>] [--archive REPORT/sub-runs] \\
        [--data-dir DIR] [--set KEY=VALUE ...]

Sub-runs finished on earlier machines are read from the archive (`reproduce --archive`).
A net none of whose seeds has finished is shown as far as seed 0 got (its run here or its
parked copy in the archive, whichever is further): its curve, the marks it has passed and
its training error so far, with no test error, time or overtaking epoch yet.
`--data-dir` and `--set` as given to `reproduce`: a sub-run of another recipe is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from resnetlab.recipes import CifarNet
from resnetlab.report import MetricsLog
from resnetlab.reproduce.archive import parked
from resnetlab.reproduce.common import Context, SubRun, devices, finished_sub_run, get_scale
from resnetlab.reproduce.degradation import final_train_error, overtakes, seed_band
from resnetlab.runs import RunDir
from resnetlab.tables import format_table

WINDOW = 5  # logged windows in a moving mean, as the report's final training error


def smoothed(runs: list, per_iteration: float) -> tuple[np.ndarray, np.ndarray]:
    """Epochs and the seeds' mean training error (%), moving mean of WINDOW windows."""
    its, errs = seed_band(runs, 0)
    w = min(WINDOW, len(its))  # a smoke run logs fewer windows
    mean = np.convolve(errs.mean(0), np.ones(w) / w, "valid")
    return np.array(its[w - 1:]) * per_iteration, mean


def under_way(ctx: Context, net: CifarNet) -> SubRun | None:
    """Seed 0 of `net` as far as it got, here or parked in the archive; None if not begun."""
    places = [RunDir(ctx.run_dir(net))]
    if ctx.archive is not None:
        places.append(parked(RunDir(ctx.archive / ctx.label(net))))
    got = [(trained[-1]["iteration"], run) for run in places
           if (trained := [r for r in MetricsLog(run).records() if r["kind"] == "train"])]
    if not got:
        return None
    run = max(got, key=lambda g: g[0])[1]
    return SubRun(net, run.path, math.nan, MetricsLog(run).records())


def _scale_of(report: Path) -> str | None:
    """The scale of the pilot already in `report`: pilot.json says it (older ones do not:
    then pilot.md's title); None if there is none."""
    js, md = report / "pilot.json", report / "pilot.md"
    if js.is_file() and (named := json.loads(js.read_text()).get("scale")):
        return str(named)
    if md.is_file() and (found := re.search(r"--scale ([\w-]+)", md.read_text())):
        return found.group(1)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="long")
    ap.add_argument("--out", type=Path, help="reproduce's root (default runs/reproduce/<scale>)")
    ap.add_argument("--report", type=Path,
                    help="folder of pilot.md (default docs/results/degradation-<scale>)")
    ap.add_argument("--archive", type=Path, help="finished sub-runs' logs (default "
                    "REPORT/sub-runs, where it exists)")
    ap.add_argument("--data-dir")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    scale = get_scale(args.scale)
    args.report = args.report or Path(f"docs/results/degradation-{scale.name}")
    there = _scale_of(args.report)
    if there not in (None, scale.name):
        sys.exit(f"{args.report} holds the pilot of --scale {there}; pass --report with "
                 "another folder")
    archive = args.archive or args.report / "sub-runs"
    ctx = Context(scale, args.out or Path("runs/reproduce") / scale.name, args.data_dir,
                  tuple(args.sets), archive=archive if archive.is_dir() else None)
    runs = {}
    for plain in (False, True):
        for depth in scale.depths:
            net = CifarNet(depth, plain=plain)
            seeds = []
            for seed in range(10):
                sub = finished_sub_run(ctx, net, seed)
                if sub is None:
                    break
                seeds.append(sub)
            if not seeds and (sub := under_way(ctx, net)) is not None:
                seeds.append(sub)
            if seeds:
                runs[net] = seeds
    if not runs:
        raise SystemExit(f"no finished sub-runs under {ctx.out / 'runs'}")
    first = next(iter(runs.values()))[0]
    per_iteration = next(r["epoch"] / r["iteration"] for r in first.records
                         if r["kind"] == "train" and r["iteration"])
    # The end of the schedule is the "final train" column, so it is not a mark of its own.
    marks = sorted(m for m in {1.0, 2.0, 3.8, *(m * per_iteration for m in scale.milestones)}
                   if m < scale.epochs)
    args.report.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    rows, results = [], {}
    for net, seeds in runs.items():
        ep, err = smoothed(seeds, per_iteration)
        line = ax.plot(ep, err, "--" if net.plain else "-", lw=1.8, label=net.label)[0]
        test = [(r["iteration"] * per_iteration, 100 * r["test_error"]) for r in seeds[0].records
                if r["kind"] == "eval" and r.get("test_error") is not None]
        ax.plot(*zip(*test, strict=True), ":", color=line.get_color(), lw=1)
        at = [float(err[np.abs(ep - m).argmin()]) if m <= ep[-1] else math.nan for m in marks]
        done = not math.isnan(seeds[0].test_error)
        speed = statistics.median(r["images_per_s"] for s in seeds for r in s.records
                                  if r["kind"] == "train" and r.get("images_per_s"))
        minutes = [s.seconds / 60 for s in seeds if s.seconds is not None]
        final = [100 * final_train_error(s) for s in seeds]
        tests = [100 * s.test_error for s in seeds] if done else []
        rows.append([net.label, len(seeds) if done else f"under way, to epoch {ep[-1]:.1f}",
                     *("—" if math.isnan(a) else f"{a:.2f}" for a in at),
                     f"{statistics.fmean(final):.2f}" + ("" if done else " so far"),
                     f"{statistics.fmean(tests):.2f}" if done else "—",
                     f"{statistics.fmean(minutes):.1f}" if minutes else "—", f"{speed:.0f}"])
        results[net.label] = {"seeds": len(seeds) if done else 0,
                              "reached_epoch": float(ep[-1]), "train_error_at_epochs": dict(
            zip([f"{m:.2f}" for m in marks], at, strict=True)), "final_train_error": final,
            "test_error": tests, "minutes": minutes, "median_images_per_s": speed}
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.set_ylim(0, 20)
    ax.grid(alpha=0.3)
    ax.legend(title="training error (moving mean of 5 windows); dotted: test", fontsize=8,
              title_fontsize=8)
    for m in scale.milestones:
        ax.axvline(m * per_iteration, color="grey", lw=0.6)
    fig.tight_layout()
    fig.savefig(args.report / "pilot.png", dpi=120)
    plt.close(fig)
    lo, hi = CifarNet(scale.depths[0]), CifarNet(scale.depths[-1])
    both = all(n in runs and not math.isnan(runs[n][0].test_error) for n in (lo, hi))
    when = overtakes(runs[hi], runs[lo]) if both else None
    results["resnet_overtakes_at_epoch"] = when
    # Where each finished sub-run trained (one under way has no eval.json to say it yet).
    finished = [s for seeds in runs.values() for s in seeds if not math.isnan(s.test_error)]
    header = ["net", "seeds", *(f"train @ {m:.1f} ep" for m in marks), "final train",
              "test", "minutes", "images/s"]
    text = [f"# Pilot: how long must the schedule be? (`--scale {scale.name}`, issue 33)", "",
            f"{scale.describe()} (lr 0.1, /10 at epochs "
            f"{' and '.join(f'{m * per_iteration:.1f}' for m in scale.milestones)}), fp32, "
            "seeds 0..N-1 (N: the table's seeds column)."
            f"{devices(finished)} Made by "
            f"`python tools/pilot_curves.py --scale {scale.name}` from the sub-runs of "
            f"`resnetlab reproduce degradation --scale {scale.name}`.", "",
            "![training error against epochs, moving mean of 5 logged windows; dotted: "
            f"test error on {scale.test_curve_images or 'all'} test images](pilot.png)", "",
            "Training error (%): the logged training batches (augmented, train mode), moving "
            "mean of 5 windows, at the epochs named; final: the last 5 windows; test: the "
            "whole test split. Minutes: as the run recorded them (other work shared the cores "
            "for part of them); images/s: the median of the logged windows.", "",
            format_table(header, rows, markdown=True), "",
            f"ResNet-{hi.depth}'s training error stays below ResNet-{lo.depth}'s "
            + (f"from epoch {when:.1f} on." if when is not None else "at no point.")
            if both else "Waiting for both residual nets to finish."]
    (args.report / "pilot.md").write_text("\n".join(text) + "\n")
    (args.report / "pilot.json").write_text(json.dumps({"scale": scale.name, **results},
                                                       indent=2) + "\n")
    print(args.report / "pilot.md")


if __name__ == "__main__":
    main()
