"""`resnetlab reproduce EXPERIMENT`: a thin wrapper over resnetlab.reproduce."""

from __future__ import annotations

import argparse
import textwrap

from ..errors import ConfigError
from ..reproduce import (
    EXPERIMENTS,
    REFERENCE_CPU,
    SCALES,
    Experiment,
    park_experiment,
    run_experiment,
)
from ..reproduce import experiment_status as status
from .cluster import add_cluster_flags, cluster_from_args


def _scales(experiment: Experiment | None) -> str:
    """Each scale with its epochs, and, for one experiment, the sub-runs it trains there."""
    lines = []
    for name, sc in SCALES.items():
        plan = f"; {experiment.plan(sc)}" if experiment else ""
        lines.append(textwrap.fill(f"{name}: {sc.describe()}{plan}", 88, break_on_hyphens=False,
                                   initial_indent="  ",
                                   subsequent_indent="      "))
    time = (f"Times: training only (evaluations add 5-15%), one seed, on {REFERENCE_CPU}, "
            "from its ResNet-20 speed scaled by depth and image size; a GPU is much faster. "
            if experiment else "")
    return ("scales (--scale):\n" + "\n".join(lines) + "\n\n" + textwrap.fill(
        time + "Finished sub-runs are shared between experiments and never trained twice; an "
        "interrupted one resumes.", 88))


def _add_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", default="cpu", metavar="SCALE",
                   help=f"one of {', '.join(SCALES)} (below); default cpu")
    p.add_argument("--out", help="root folder (default runs/reproduce/<scale>)")
    p.add_argument("--data-dir", help="folder holding the data set's files")
    p.add_argument("--seeds", type=int, default=1,
                   help="sub-runs per network (seeds 0..N-1) where errors are compared "
                   "(degradation, shortcuts, preact): reports give mean ± std and each "
                   "seed's number")
    p.add_argument("--plain-seeds", type=int, metavar="M",
                   help="sub-runs per plain network, at most --seeds (default: --seeds); "
                   "e.g. --seeds 3 --plain-seeds 1, where one seed of the control suffices")
    p.add_argument("--jobs", type=int, default=1,
                   help="sub-runs trained at once, each in its own process (on a CPU with "
                   "cores/N threads each; on a GPU, N processes share it)")
    p.add_argument("--archive", metavar="DIR",
                   help="folder of finished sub-runs' logs (config, metrics, eval report), "
                   "e.g. committed beside a report: sub-runs found there are not trained "
                   "again, and each one finished here is added, so a long experiment can "
                   "finish across machines; an unfinished one parked there (Ctrl-C, "
                   "--park) resumes here")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training setting of every sub-run (repeatable)")
    p.add_argument("--status", action="store_true",
                   help="say where each sub-run stands (done, pending, running, failed, "
                   "started, not started) and exit, without training or waiting")
    p.add_argument("--park", action="store_true",
                   help="copy each unfinished sub-run's latest checkpoint into --archive "
                   "and exit, without training (it may run beside the training, e.g. before "
                   "the machine goes): the same command on the next machine resumes there")
    add_cluster_flags(p, train=False)


def add_reproduce_parser(sub: argparse._SubParsersAction,
                         common: argparse.ArgumentParser) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    r = sub.add_parser(
        "reproduce", parents=[common], help="run one of the paper's experiments",
        formatter_class=raw,
        description="Train what the experiment needs (resumable; finished sub-runs are reused), "
        "measure, and write figures, report.md and results.json. `resnetlab reproduce "
        "EXPERIMENT --help` gives the sub-runs and time of each scale.", epilog=_scales(None))
    experiments = r.add_subparsers(dest="experiment", required=True, metavar="EXPERIMENT")
    for name, exp in [*EXPERIMENTS.items(), ("all", None)]:
        summary = exp.summary if exp else "every experiment in turn, sharing sub-runs"
        e = experiments.add_parser(name, parents=[common], help=summary, description=summary,
                                   formatter_class=raw, epilog=_scales(exp))
        _add_flags(e)
        e.set_defaults(func=cmd_reproduce, trains=True, interrupted=(
            "interrupted; each stopped sub-run keeps a checkpoint (parked in --archive, if "
            "given): the same command continues"))


def cmd_reproduce(args: argparse.Namespace) -> int:
    names = list(EXPERIMENTS) if args.experiment == "all" else [args.experiment]
    if args.status:
        for name in names:
            states = status(name, args.scale, args.out, args.data_dir, args.sets,
                            args.seeds, args.archive, args.plain_seeds)
            print(f"{name}, scale {args.scale}:" + ("" if states else " no sub-runs"))
            for head, state in states:
                print(f"  {head}: {state}")
        return 0
    if args.park:
        if args.archive is None:
            raise ConfigError("--park copies into the --archive folder: name it, e.g. "
                              f"--archive docs/results/{names[0]}-{args.scale}/sub-runs")
        for name in names:
            print(f"{name}, scale {args.scale}:")
            for head, said in park_experiment(name, args.scale, args.archive, args.out,
                                              args.data_dir, args.sets, args.seeds,
                                              args.plain_seeds):
                print(f"  {head}: {said}")
        return 0
    cluster = cluster_from_args(args)
    if cluster is not None and args.jobs != 1:
        raise ConfigError("--jobs runs sub-runs in processes here; with --executor each is "
                          "a job already (--array-parallelism sets how many at once)")
    for i, name in enumerate(names, 1):
        print(f"== experiment {i}/{len(names)}: {name} ({EXPERIMENTS[name].summary}), "
              f"scale {args.scale}", flush=True)
        folder = run_experiment(name, args.scale, args.out, args.data_dir, args.sets,
                                seeds=args.seeds, jobs=args.jobs, archive=args.archive,
                                plain_seeds=args.plain_seeds, cluster=cluster)
        print(f"report: {folder / 'report.md'}", flush=True)
    return 0
