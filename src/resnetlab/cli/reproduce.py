"""`resnetlab reproduce EXPERIMENT`: a thin wrapper over resnetlab.reproduce."""

from __future__ import annotations

import argparse

from ..reproduce import EXPERIMENTS, SCALES, run_experiment


def add_reproduce_parser(sub: argparse._SubParsersAction,
                         common: argparse.ArgumentParser) -> None:
    r = sub.add_parser(
        "reproduce", parents=[common], help="run one of the paper's experiments",
        description="Train what the experiment needs (resumable; finished sub-runs are reused), "
        "measure, and write figures, report.md and results.json. Experiments: "
        + "; ".join(f"{k}: {v[1]}" for k, v in EXPERIMENTS.items()))
    r.add_argument("experiment", choices=[*EXPERIMENTS, "all"])
    r.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="smoke: seconds; cpu: Fashion-MNIST on a laptop (degradation about an "
                   "hour on 2 cores); converge: Fashion-MNIST towards convergence (degradation "
                   "at 20 and 56 layers, 3 seeds: about 2.5 hours on 2 cores); paper: "
                   "CIFAR-10, 64k iterations (needs the data, a GPU)")
    r.add_argument("--out", help="root folder (default runs/reproduce/<scale>)")
    r.add_argument("--data-dir", help="folder holding the data set's files")
    r.add_argument("--seeds", type=int, default=1,
                   help="sub-runs per network (seeds 0..N-1) where errors are compared "
                   "(degradation, shortcuts, preact): reports give mean ± std and each "
                   "seed's number")
    r.add_argument("--jobs", type=int, default=1,
                   help="sub-runs trained at once, each in its own process (on a CPU with "
                   "cores/N threads each; on a GPU, N processes share it)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting of every sub-run (repeatable)")
    r.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    for i, name in enumerate(names, 1):
        print(f"== experiment {i}/{len(names)}: {name} ({EXPERIMENTS[name][1]}), "
              f"scale {args.scale}", flush=True)
        folder = run_experiment(name, args.scale, args.out, args.data_dir, args.sets,
                                seeds=args.seeds, jobs=args.jobs)
        print(f"report: {folder / 'report.md'}", flush=True)
    return 0
