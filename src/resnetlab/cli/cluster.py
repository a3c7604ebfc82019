"""The `--executor` flags that `train` and `reproduce` share, read into one ClusterConfig."""

from __future__ import annotations

import argparse

from ..config import EXECUTORS, ClusterConfig, resolve_cluster
from ..errors import ConfigError

# the flags both commands have, each named as its ClusterConfig key
_SHARED = ("partition", "time_limit_min", "cpus_per_task", "gpus_per_node", "mem_gb")
_SLURM_ONLY = ("partition", "time_limit_min", "mem_gb")  # a local job runs here, unlimited


def add_cluster_flags(p: argparse.ArgumentParser, train: bool) -> None:
    """--executor and the resources of its jobs; `train` adds --nodes, `reproduce`
    --array-parallelism."""
    g = p.add_argument_group("jobs on SLURM or local processes (submitit: pip install "
                             "'resnetlab[cluster]')")
    g.add_argument("--executor", choices=EXECUTORS,
                   help="run as submitit jobs: slurm (sbatch from a login node; requeued on "
                   "time-out or pre-emption, resuming), local (processes here), debug (in "
                   "this process)" + ("" if train else "; one job per sub-run, one SLURM "
                                      "array per experiment"))
    g.add_argument("--cluster-config", metavar="FILE",
                   help="YAML file with a cluster: section (partition, account, qos, setup "
                   "lines, sbatch options, ...; the configuration reference lists them); "
                   "the flags override it")
    g.add_argument("--partition", help="SLURM partition (slurm only)")
    g.add_argument("--time-limit", dest="time_limit_min", type=int, metavar="MIN",
                   help="minutes per SLURM job (default 240; slurm only: local jobs have "
                   "no limit); a job that reaches it is requeued and resumes")
    g.add_argument("--cpus-per-task", type=int, metavar="N",
                   help="cores per process, and its PyTorch threads (default 2)")
    g.add_argument("--gpus-per-node", type=int, metavar="G",
                   help="GPUs per machine (default 0)"
                   + ("; one process per GPU" if train else ""))
    g.add_argument("--mem-gb", type=float, metavar="GB", help="memory per machine (slurm only)")
    if train:
        g.add_argument("--nodes", type=int, metavar="N",
                       help="machines (default 1): one data-parallel job over N x G processes")
    else:
        g.add_argument("--array-parallelism", type=int, metavar="N",
                       help="sub-runs running at once (default 32)")


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-").replace("-min", "")


def cluster_from_args(args: argparse.Namespace) -> ClusterConfig | None:
    """The ClusterConfig the flags ask for; None without --executor or --cluster-config
    (and then no resource flag may be given). A flag the executor would ignore is refused;
    a site file's SLURM settings simply do not apply to local jobs."""
    train = hasattr(args, "nodes")
    keys = [*_SHARED, "nodes" if train else "array_parallelism"]
    flags = {k: getattr(args, k) for k in keys}
    given = [k for k, v in flags.items() if v is not None]
    if args.executor is None and args.cluster_config is None:
        if given:
            raise ConfigError(f"{_flag(given[0])} needs --executor (slurm, local or debug)")
        return None
    cc = resolve_cluster(args.cluster_config, {**flags, "executor": args.executor})
    ignored = [k for k in given if k in _SLURM_ONLY]
    if cc.executor != "slurm" and ignored:
        raise ConfigError(f"{_flag(ignored[0])} is for --executor slurm; {cc.executor} jobs "
                          "run on this machine, without a time limit")
    if not train and (cc.nodes != 1 or cc.gpus_per_node > 1):
        raise ConfigError("each reproduce sub-run is one process on one machine with at most "
                          "one GPU: cluster.nodes must be 1 and gpus_per_node 0 or 1 "
                          "(train --executor takes more)")
    return cc
