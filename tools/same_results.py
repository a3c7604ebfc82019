"""Do two `resnetlab reproduce` output folders hold the same results? Issue 35's check that
sub-runs trained as submitit jobs (`--executor local`) end as those trained by `--jobs`.

For EXPERIMENT's results.json in each folder: its "errors" and "per_seed" numbers, compared
for equality; for every sub-run both folders trained: its final weights, tensor for tensor,
and its recorded training minutes. Prints a Markdown table and exits 1 if anything differs.

    python tools/same_results.py runs/reproduce/cpu-jobs2 runs/reproduce/cpu-local \\
        [--experiment degradation]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import resnetlab
from resnetlab.runs import RunDir
from resnetlab.tables import format_table


def _minutes(run: RunDir) -> str:
    seconds = json.loads(run.eval_report.read_text()).get("train_seconds")
    return "" if seconds is None else f"{seconds / 60:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--experiment", default="degradation")
    args = ap.parse_args()
    res = [json.loads((d / args.experiment / "results.json").read_text())
           for d in (args.a, args.b)]
    same = all(res[0][k] == res[1][k] for k in ("errors", "per_seed"))
    rows = []
    for run_a in sorted((args.a / "runs").iterdir()):
        a, b = RunDir(run_a), RunDir(args.b / "runs" / run_a.name)
        if not (a.finished() and b.finished()):
            continue
        sa, sb = (resnetlab.load_model(r.final).state_dict() for r in (a, b))
        equal = sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
        same &= equal
        test = json.loads(a.eval_report.read_text())["top1_error"]
        rows.append([run_a.name, f"{100 * test:.2f}", "identical" if equal else "DIFFER",
                     _minutes(a), _minutes(b)])
    print(format_table(["sub-run", "test error %", "final weights", f"minutes ({args.a.name})",
                        f"minutes ({args.b.name})"], rows, markdown=True))
    print(f"\nresults.json errors and per_seed: {'identical' if same else 'DIFFER'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
