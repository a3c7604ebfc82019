"""Training jobs on SLURM, or in local processes, through submitit (`--executor`).

submitit (facebookincubator/submitit) pickles a callable into a jobs folder, starts it
(sbatch and srun on SLURM, a process on this machine) and pickles its outcome beside it.
SLURM signals a job 90 s before its time limit and when it is pre-empted; submitit then
asks the callable's `checkpoint()` what to run instead, requeues the job and exits. A
resnetlab job is `train(cfg, run_dir, resume=True)`, so what runs instead is the same call:
the requeued job resumes from the run directory's newest checkpoint and ends where an
uninterrupted run ends (the run directory's own guarantee); what it loses is the steps
since that checkpoint (`checkpoint_every`, `eval_every`).

The jobs folder (`reproduce`: <out>/jobs/; `train`: RUN/jobs/):

    jobs.json                         label -> executor and job id, written at submission;
                                      `reproduce --status` and a rerun of the command read it
    <job id>_submission.sh            the sbatch script (SLURM), as submitted
    <job id>_submitted.pkl            the pickled job; <job id>_<task>_result.pkl its outcome
    <job id>_<task>_log.out, .err     each task's output
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .config import ClusterConfig, TrainConfig
from .errors import ConfigError, ResNetLabError
from .runs import RunDir

log = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"
# SLURM's states (sacct) as `reproduce --status` words them; others read "failed".
_SLURM_STATES = {"PENDING": "pending", "REQUEUED": "pending", "CONFIGURING": "pending",
                 "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
                 "PREEMPTED": "pending", "COMPLETED": "done"}


class JobFailed(ResNetLabError):
    """A job that ended without finishing its run (its run directory keeps the checkpoints)."""


def submitit_module() -> ModuleType:
    """submitit, or a one-line ConfigError saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("--executor needs submitit: pip install 'resnetlab[cluster]'") from None
    return submitit


@dataclass(frozen=True)
class TrainJob:
    """One job: train `cfg` into `run_dir`. `threads`: PyTorch
    threads (the job's cpus_per_task, as `reproduce --jobs` gives each worker its share);
    `distributed`: one task of a multi-process job, whose ranks come from SLURM's
    environment (or the local executor's)."""

    cfg: TrainConfig
    run_dir: str
    threads: int = 0
    distributed: bool = False
    resume: bool = True  # the first start's `train --resume`; a requeued job always resumes

    def __call__(self) -> dict[str, Any] | None:
        # Imported here: the job runs in a fresh process on another machine.
        from .train.loop import train

        if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):  # a job's own process
            # the trainer's progress lines into the job's log, as the CLI shows them
            logging.basicConfig(level=logging.WARNING, format="%(message)s")
            logging.getLogger("resnetlab").setLevel(logging.INFO)
        if self.distributed:
            # MASTER_ADDR (the first node), MASTER_PORT (from the job id), RANK, WORLD_SIZE,
            # LOCAL_RANK: what train/distributed.py's env:// rendezvous reads.
            submitit_module().helpers.TorchDistributedEnvironment().export(
                set_cuda_visible_devices=False, overwrite=True)
        threads = torch.get_num_threads()  # the debug executor runs jobs in the caller
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            res = train(self.cfg, self.run_dir, resume=self.resume, progress=False)
        finally:
            torch.set_num_threads(threads)
        if os.environ.get("RANK", "0") != "0":
            return None
        return {"test_error": res.test.top1_error, "seconds": res.seconds, "pid": os.getpid()}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """SLURM's warning (time limit or pre-emption): requeue the same call, which resumes
        from the run directory's newest checkpoint."""
        again = dataclasses.replace(self, resume=True)
        return submitit_module().helpers.DelayedSubmission(again, *args, **kwargs)


def make_executor(cc: ClusterConfig, folder: Path, name: str, nodes: int = 1,
                  tasks_per_node: int = 1) -> Any:
    """A submitit executor for `cc`, writing into `folder`: each job `nodes` machines of
    `tasks_per_node` processes (a reproduce sub-run: 1 and 1)."""
    submitit = submitit_module()
    try:
        ex = submitit.AutoExecutor(folder=folder, cluster=cc.executor,
                                   slurm_max_num_timeout=cc.max_requeues)
    except RuntimeError as e:  # no srun on PATH
        raise ConfigError(f"--executor {cc.executor}: {e} (use --executor local on this "
                          "machine)") from None
    ex.update_parameters(
        name=name, timeout_min=cc.time_limit_min, nodes=nodes, tasks_per_node=tasks_per_node,
        gpus_per_node=cc.gpus_per_node or None, cpus_per_task=cc.cpus_per_task, mem_gb=cc.mem_gb,
        slurm_partition=cc.partition, slurm_account=cc.account, slurm_qos=cc.qos,
        slurm_array_parallelism=cc.array_parallelism, slurm_setup=cc.setup or None,
        slurm_additional_parameters=cc.sbatch or None)
    return ex


def read_jobs(folder: Path) -> dict[str, dict[str, str]]:
    """label -> {"executor", "job_id"} of the jobs submitted from `folder`."""
    path = folder / JOBS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(folder: Path, executor: str, jobs: dict[str, Any]) -> None:
    """Add label -> job id to jobs.json (a whole new file, renamed into place)."""
    known = read_jobs(folder)
    known.update({label: {"executor": executor, "job_id": str(job.job_id)}
                  for label, job in jobs.items()})
    tmp = folder / f".{JOBS_FILE}.tmp"
    tmp.write_text(json.dumps(known, indent=2) + "\n")
    tmp.replace(folder / JOBS_FILE)


def _local_alive(job_id: str) -> bool:
    """Whether the local executor's controller process `job_id` still runs."""
    try:
        return "submitit" in Path(f"/proc/{int(job_id)}/cmdline").read_text()
    except (OSError, ValueError):
        return False


def _outcome(folder: Path, job_id: str) -> str | None:
    """"done" or "failed" from the job's result file; None while it has none."""
    submitit = submitit_module()
    paths = submitit.core.utils.JobPaths(folder, job_id, 0)
    if not paths.result_pickle.is_file():
        return None
    kind, _ = submitit.core.utils.pickle_load(paths.result_pickle)
    return "done" if kind == "success" else "failed"


def job_state(folder: Path, entry: dict[str, str]) -> str:
    """pending, running, done or failed (or "unknown"), without waiting."""
    job_id, executor = entry["job_id"], entry["executor"]
    ended = _outcome(folder, job_id)
    if ended is not None:
        return ended
    if executor == "local":
        return "running" if _local_alive(job_id) else "failed"
    if executor == "slurm":
        job = submitit_module().SlurmJob(folder, job_id)
        state = job.watcher.get_state(job_id, mode="force").split()[0]
        return _SLURM_STATES.get(state, "unknown" if state == "UNKNOWN" else "failed")
    return "unknown"


def _live(folder: Path, entry: dict[str, str] | None) -> bool:
    return entry is not None and job_state(folder, entry) in ("pending", "running")


def run_jobs(cc: ClusterConfig, folder: Path, jobs: Sequence[tuple[str, TrainJob]],
             say: Callable[[str], None] = log.info, nodes: int = 1,
             tasks_per_node: int = 1) -> Iterator[tuple[str, Any]]:
    """Run each (label, job) and yield (label, its result, or the exception it failed
    with) as each ends. On SLURM the new jobs are one job array, and a job still pending or
    running from an earlier call (jobs.json) is waited for, not submitted again; locally at
    most `array_parallelism` processes run at once, and one still running from an earlier
    call is an error (its run directory is in use). Each job: `nodes` machines of
    `tasks_per_node` processes."""
    folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(cc, folder, f"resnetlab-{folder.parent.name}", nodes, tasks_per_node)
    known = read_jobs(folder)
    if cc.executor == "debug":  # in this process, in order
        for label, job in jobs:
            yield label, _result(ex.submit(job), label, folder)
        return
    waiting, active = [], {}
    submitit = submitit_module()
    for label, job in jobs:
        entry = known.get(label)
        if not _live(folder, entry):
            waiting.append((label, job))
        elif entry is not None and entry["executor"] == "slurm" == cc.executor:
            active[label] = submitit.SlurmJob(folder, entry["job_id"])
            say(f"{label}: waiting for job {entry['job_id']}, submitted earlier")
        else:
            raise ConfigError(f"{label} is still training in job {entry and entry['job_id']} "
                              f"({folder / JOBS_FILE}); wait for it to end or stop it")
    if cc.executor == "slurm" and waiting:
        with ex.batch():
            new = {label: ex.submit(job) for label, job in waiting}
        _record(folder, cc.executor, new)
        first = next(iter(new.values())).job_id.split("_")[0]
        what = (f"{len(new)} jobs as SLURM array {first} (at most {cc.array_parallelism} at "
                "once)" if len(new) > 1 else f"SLURM job {first}")
        say(f"submitted {what}; scripts and logs in {folder}")
        active.update(new)
        waiting = []
    # A job's end shows as its result file (a stat per job); submitit's watcher spaces
    # out the sacct calls for a job that ends without one, so polling often costs SLURM nothing.
    poll = 2.0
    try:
        while waiting or active:
            while waiting and len(active) < cc.array_parallelism:
                label, job = waiting.pop(0)
                active[label] = ex.submit(job)
                _record(folder, cc.executor, {label: active[label]})
                say(f"{label}: started as local job {active[label].job_id}; log in {folder}")
            for label, job in list(active.items()):
                if job.done():
                    del active[label]
                    yield label, _result(job, label, folder)
            time.sleep(poll if active else 0)
    except KeyboardInterrupt:
        if cc.executor == "slurm" and active:
            say(f"stopped waiting; {len(active)} SLURM job(s) go on: --status shows them, and "
                "the same command waits for them again")
        raise


def _result(job: Any, label: str, folder: Path) -> Any:
    """The job's result (its first task's), or a JobFailed saying why and where to look."""
    try:
        return job.results()[0]
    except Exception as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return JobFailed(f"{label}: job {job.job_id} ended unfinished ({why}); its output is "
                         f"in {folder}, and the same command resumes it from its last "
                         "checkpoint")


def train_job(cc: ClusterConfig, cfg: TrainConfig, run_dir: Path, resume: bool,
              say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """`train --executor`: one job of cc.nodes machines, one process per GPU (or one), that
    trains `cfg` into `run_dir`, waited for; returns rank 0's result, raises its error."""
    tasks = cc.tasks_per_node
    job = TrainJob(cfg, str(run_dir.resolve()), cc.cpus_per_task, cc.nodes * tasks > 1, resume)
    [(_, outcome)] = run_jobs(cc, RunDir(run_dir).jobs, [(run_dir.name, job)], say, cc.nodes,
                              tasks)
    if isinstance(outcome, BaseException):
        raise outcome
    return dict(outcome)
