"""`resnetlab bench time-to-accuracy`: the README's main job, timed end to end.

    resnetlab bench time-to-accuracy [--out DIR] [--set KEY=VALUE ...]

Runs `resnetlab train --preset fashion-mnist` in a fresh run directory as a separate
process (so the time includes start-up and data loading, as a user sees it), then reports
the wall time, the final test accuracy and, from the run's evaluations, the training time
at which test accuracy first reached 90/92/93/94%. Writes the figures as JSON beside the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..report import MetricsLog
from ..runs import RunDir
from .common import machine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench time-to-accuracy",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", help="run directory (default: a new temporary folder)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="resnetlab-demo-")) / "run"
    cmd = [sys.executable, "-m", "resnetlab", "train", "--preset", "fashion-mnist",
           "--out", str(out)] + [f"--set={s}" for s in args.sets]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    run = RunDir(out)
    result = json.loads(run.eval_report.read_text())
    rows = [r for r in MetricsLog(run).records() if r.get("kind") == "eval"]
    reached = {}
    for target in (0.90, 0.92, 0.93, 0.94):
        hit = next((r for r in rows if r["test_error"] is not None
                    and 1 - r["test_error"] >= target), None)
        reached[f"{int(target * 100)}%"] = None if hit is None else float(hit["elapsed_s"])
    report = {
        "command": " ".join(cmd), "wall_s": round(wall, 1),
        "test_accuracy": round(1 - result["top1_error"], 4),
        "train_seconds_to_test_accuracy": reached,
        "machine": machine(),
    }
    (out.parent / "bench-demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwall time {wall / 60:.1f} min, test accuracy {100 * report['test_accuracy']:.2f}%")
    for k, v in reached.items():
        print(f"  test accuracy >= {k}: " + ("not reached" if v is None else f"{v / 60:.1f} min"))
    print(f"figures: {out.parent / 'bench-demo.json'}")
    return 0
