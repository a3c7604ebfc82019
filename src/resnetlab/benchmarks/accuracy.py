"""`resnetlab bench time-to-accuracy`: a preset's whole run, timed end to end, over seeds.

    resnetlab bench time-to-accuracy [--preset NAME] [--seeds N] [--out DIR] [--set K=V ...]

Runs `resnetlab train --preset NAME` (default: the README's fashion-mnist) in a fresh run
directory per seed, each as a separate process (so the time includes start-up and data
loading, as a user sees it), one after the other (two runs on the cores would slow each
other). Reports per seed the wall time, the final test accuracy and, from the run's
evaluations, the training time at which test accuracy first reached each of TARGETS; then
the median and range over the seeds. The test set only reports: every choice a preset makes
was made on its validation split. Writes the figures as JSON beside the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..report import MetricsLog
from ..runs import RunDir
from ..tables import format_table
from ..train.request import DEFAULT_PRESET
from .common import machine

TARGETS = (0.90, 0.92, 0.93, 0.94, 0.95)


def reached(rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """Training seconds at which test accuracy was first seen at or above each target, from
    a run's evaluation records (None: not reached)."""
    out: dict[str, float | None] = {}
    for target in TARGETS:
        hit = next((r for r in rows if r.get("test_error") is not None
                    and 1 - r["test_error"] >= target), None)
        out[f"{round(target * 100)}%"] = None if hit is None else float(hit["elapsed_s"])
    return out


def one_run(preset: str, out: Path, sets: list[str], seed: int | None) -> dict[str, Any]:
    """Train `preset` into `out` in a child process (with `seed`, if given); its figures."""
    seed_set = [] if seed is None else [f"--set=seed={seed}"]
    cmd = [sys.executable, "-m", "resnetlab", "train", "--preset", preset, "--out", str(out)] \
        + [f"--set={s}" for s in sets] + seed_set
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    run = RunDir(out)
    result = json.loads(run.eval_report.read_text())
    rows = [r for r in MetricsLog(run).records() if r.get("kind") == "eval"]
    return {"command": " ".join(cmd), "seed": seed, "wall_s": round(wall, 1),
            "train_s": result.get("train_seconds"),
            "test_accuracy": round(1 - result["top1_error"], 4),
            "tta": result.get("tta", "center"), "precision": result.get("precision"),
            "train_seconds_to_test_accuracy": reached(rows)}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over the runs of wall time and test accuracy."""
    acc = [r["test_accuracy"] for r in runs]
    wall = [r["wall_s"] for r in runs]
    return {"runs": len(runs), "test_accuracy_median": statistics.median(acc),
            "test_accuracy_min": min(acc), "test_accuracy_max": max(acc),
            "wall_s_median": statistics.median(wall), "wall_s_min": min(wall),
            "wall_s_max": max(wall)}


def table(runs: list[dict[str, Any]]) -> str:
    rows = [[str(r["seed"] if r["seed"] is not None else "preset's"),
             f"{r['wall_s'] / 60:.2f}", f"{100 * r['test_accuracy']:.2f}%",
             *("-" if v is None else f"{v / 60:.1f}"
               for v in r["train_seconds_to_test_accuracy"].values())] for r in runs]
    heads = ["seed", "wall min", "test accuracy",
             *(f"min to {round(t * 100)}%" for t in TARGETS)]
    return format_table(heads, rows, markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench time-to-accuracy",
                                description=__doc__.splitlines()[0])
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"the preset to train (default {DEFAULT_PRESET}; the fast recipe: "
                        "fashion-mnist-fast)")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs with seeds 0..N-1, one after the other (default 1: the preset's "
                        "own seed)")
    p.add_argument("--out", help="folder for the runs (default: a new temporary folder)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be 1 or more")
    root = Path(args.out or tempfile.mkdtemp(prefix="resnetlab-tta-"))
    if args.seeds == 1:
        runs = [one_run(args.preset, root / "run", args.sets, None)]
    else:
        runs = [one_run(args.preset, root / f"seed{k}", args.sets, k) for k in range(args.seeds)]
    report = {"preset": args.preset, "sets": args.sets, "runs": runs,
              "summary": summary(runs), "machine": machine()}
    path = root / "bench-time-to-accuracy.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    print(f"\n{args.preset} on {report['machine']['cpu']} ({report['machine']['kind']}), "
          f"{len(runs)} run(s):")
    print(table(runs))
    print(f"median: test accuracy {100 * s['test_accuracy_median']:.2f}% "
          f"(range {100 * s['test_accuracy_min']:.2f}-{100 * s['test_accuracy_max']:.2f}%), "
          f"wall {s['wall_s_median'] / 60:.2f} min "
          f"(range {s['wall_s_min'] / 60:.2f}-{s['wall_s_max'] / 60:.2f})")
    print(f"figures: {path}")
    return 0
