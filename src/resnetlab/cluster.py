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
    .lock                             held while jobs are submitted (SLURM) or run (local)
    <job id>_submission.sh            the sbatch script (SLURM), as submitted
    <job id>_submitted.pkl            the pickled job; <job id>_<task>_result.pkl its outcome
    <job id>_<task>_log.out, .err     each task's output
"""

from __future__ import annotations

import contextlib
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
from .runs import RunDir, hold
from .train.loop import RunResult, finished_result, train
from .train.setup import check_run_dir

log = logging.getLogger(__name__)

JOBS_FILE = "jobs.json"
# SLURM's states (sacct) as `reproduce --status` words them; the others (CANCELLED,
# FAILED, TIMEOUT without a requeue, ...) read "failed", and one sacct does not know
# (yet, or any more) "unknown".
_SLURM_STATES = {
    **dict.fromkeys(("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                     "SPECIAL_EXIT", "CONFIGURING", "PREEMPTED"), "pending"),
    **dict.fromkeys(("RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING",
                     "STAGE_OUT", "RESIZING"), "running"),
    "COMPLETED": "done", "UNKNOWN": "unknown"}
# Locally there is no queue to set a limit: a job runs until it ends.
_LOCAL_TIME_LIMIT_MIN = 60 * 24 * 365
_NO_GPU_SETTING = "<unset>"  # TrainJob.gpus_seen: the shell had no CUDA_VISIBLE_DEVICES


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
    """One job: train `cfg` into `run_dir`. `threads`: PyTorch threads (the job's
    cpus_per_task, as `reproduce --jobs` gives each worker its share); `distributed`: one
    task of a multi-process job, whose ranks come from SLURM's environment (or the local
    executor's)."""

    cfg: TrainConfig
    run_dir: str
    threads: int = 0
    distributed: bool = False
    resume: bool = True  # train's `resume`: what `train --resume` asks is checked before submitting
    # The local executor exports CUDA_VISIBLE_DEVICES of exactly gpus_per_node devices, so
    # with none asked for it would hide the GPUs the same command sees without --executor:
    # the submitting shell's value (_NO_GPU_SETTING: it had none) is put back.
    gpus_seen: str | None = None

    def __call__(self) -> dict[str, Any] | None:
        if self.gpus_seen is not None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            if self.gpus_seen != _NO_GPU_SETTING:
                os.environ["CUDA_VISIBLE_DEVICES"] = self.gpus_seen
        if os.environ.get("SUBMITIT_EXECUTOR") in ("slurm", "local"):
            # A job's own process, where no CLI set up logging: the trainer's progress
            # lines go to the job's log, as the CLI prints them.
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
    local = cc.executor != "slurm"
    ex.update_parameters(
        name=name, timeout_min=_LOCAL_TIME_LIMIT_MIN if local else cc.time_limit_min,
        nodes=nodes, tasks_per_node=tasks_per_node,
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


def _earlier(folder: Path, cc: ClusterConfig, label: str, entry: dict[str, str] | None
             ) -> Any | None:
    """The SLURM job an earlier call submitted for `label` and that is still pending or
    running, to wait for; None where a new job is due. A local job still running, or a job
    whose state cannot be told, is an error: it may be training into the run directory."""
    if entry is None:
        return None
    state, job_id = job_state(folder, entry), entry["job_id"]
    if state in ("done", "failed"):
        return None
    if state != "unknown" and entry["executor"] == "slurm" == cc.executor:
        return submitit_module().SlurmJob(folder, job_id)
    ask = f" (squeue -j {job_id}; scancel {job_id} stops it)" if entry["executor"] == "slurm" \
        else ""
    raise ConfigError(f"{label}: {entry['executor']} job {job_id} from an earlier call is "
                      f"{state}{ask}; wait for it to end or stop it ({folder / JOBS_FILE})")


def _submit(ex: Any, cc: ClusterConfig, jobs: Sequence[tuple[str, TrainJob]]
            ) -> dict[str, Any]:
    """Submit `jobs`, on SLURM as one array; sbatch's refusal as a one-line ConfigError."""
    utils = submitit_module().core.utils
    try:
        if cc.executor != "slurm":
            return {label: ex.submit(job) for label, job in jobs}
        with ex.batch():
            new = {label: ex.submit(job) for label, job in jobs}
        return new
    except (utils.UncompletedJobError, utils.FailedSubmissionError) as e:
        raise ConfigError(f"{cc.executor} refused the job{'s' if len(jobs) > 1 else ''}: "
                          f"{_last_line(e)}") from None


def _last_line(e: BaseException) -> str:
    """An error's last non-empty line: a traceback's own error, or sbatch's complaint."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(e).__name__


def run_jobs(cc: ClusterConfig, folder: Path, jobs: Sequence[tuple[str, TrainJob]],
             say: Callable[[str], None] = log.info, nodes: int = 1, tasks_per_node: int = 1,
             again: str = "the same command resumes it from its last checkpoint"
             ) -> Iterator[tuple[str, Any]]:
    """Run each (label, job) and yield (label, its result, or the JobFailed it ended with)
    as each ends. On SLURM the new jobs are one job array, and a job still pending or
    running from an earlier call (jobs.json) is waited for, not submitted again; locally at
    most `array_parallelism` processes run at once, and one still running from an earlier
    call is an error (its run directory is in use). Each job: `nodes` machines of
    `tasks_per_node` processes. `again`: what a failure's message tells the user to do.

    The folder's lock keeps two calls from submitting the same sub-runs: on SLURM while
    they are submitted, locally (where this process runs them) until all have ended."""
    folder.mkdir(parents=True, exist_ok=True)
    ex = make_executor(cc, folder, f"resnetlab-{folder.parent.name}", nodes, tasks_per_node)
    if cc.executor == "local" and not cc.gpus_per_node:
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", _NO_GPU_SETTING)
        jobs = [(label, dataclasses.replace(job, gpus_seen=seen)) for label, job in jobs]
    with contextlib.ExitStack() as held:
        held.enter_context(hold(folder / ".lock", folder))
        if cc.executor == "debug":  # in this process, in order
            for label, job in jobs:
                yield label, _result(ex.submit(job), label, folder, again)
            return
        known = read_jobs(folder)
        active, waiting = {}, []
        for label, job in jobs:
            earlier = _earlier(folder, cc, label, known.get(label))
            if earlier is None:
                waiting.append((label, job))
            else:
                active[label] = earlier
                say(f"{label}: waiting for job {earlier.job_id}, submitted earlier")
        if cc.executor == "slurm":
            if waiting:
                new = _submit(ex, cc, waiting)
                _record(folder, cc.executor, new)
                first = next(iter(new.values())).job_id.split("_")[0]
                what = (f"{len(new)} jobs as SLURM array {first} (at most "
                        f"{cc.array_parallelism} at once)" if len(new) > 1
                        else f"SLURM job {first}")
                say(f"submitted {what}; scripts and logs in {folder}")
                active.update(new)
                waiting = []
            held.close()  # SLURM runs them: the lock was for submitting
        yield from _wait(ex, cc, folder, active, waiting, say, again)


def _wait(ex: Any, cc: ClusterConfig, folder: Path, active: dict[str, Any],
          waiting: list[tuple[str, TrainJob]], say: Callable[[str], None], again: str
          ) -> Iterator[tuple[str, Any]]:
    """Yield each job's outcome as it ends, starting the `waiting` (local) ones as others
    end, at most array_parallelism at once."""
    # A job's end shows as its result file (a stat per job); submitit's watcher spaces
    # out the sacct calls for a job that ends without one, so polling often costs SLURM nothing.
    poll = 2.0
    try:
        while waiting or active:
            while waiting and len(active) < cc.array_parallelism:
                label, job = waiting.pop(0)
                active.update(_submit(ex, cc, [(label, job)]))
                _record(folder, cc.executor, {label: active[label]})
                say(f"{label}: started as local job {active[label].job_id}; log in {folder}")
            for label, job in list(active.items()):
                if job.done():
                    del active[label]
                    yield label, _result(job, label, folder, again)
            time.sleep(poll if active else 0)
    except KeyboardInterrupt:
        if cc.executor == "slurm" and active:
            say(f"stopped waiting; {len(active)} SLURM job(s) go on: --status shows them, and "
                "the same command waits for them again")
        raise


def _result(job: Any, label: str, folder: Path, again: str) -> Any:
    """The job's result (its first task's), or a JobFailed saying why and what to do."""
    try:
        return job.results()[0]
    except Exception as e:
        return JobFailed(f"{label}: job {job.job_id} ended unfinished ({_last_line(e)}); its "
                         f"output is in {folder}, and {again}")


def train_job(cc: ClusterConfig, cfg: TrainConfig, run_dir: Path, resume: bool,
              say: Callable[[str], None] = log.info) -> RunResult:
    """`train --executor`: one job of cc.nodes machines, one process per GPU (or one), that
    trains `cfg` into `run_dir`, waited for; the finished run as its files report it, or
    its error. The run directory is checked against `resume` here, before anything is
    submitted, as `train` checks it, and a finished run is reported, not submitted again."""
    run = RunDir(run_dir)
    check_run_dir(cfg, run, resume)
    if resume and run.finished():
        return finished_result(run, cfg)
    tasks = cc.tasks_per_node
    # The job always resumes: this login-node check is `--resume`'s, and a job SLURM itself
    # requeues (node failure, preemption by SIGTERM, `scontrol requeue`) reruns the pickle
    # submitted first, which with resume=False would refuse its own run directory.
    job = TrainJob(cfg, str(run.path.resolve()), cc.cpus_per_task, cc.nodes * tasks > 1, True)
    again = "the same command" + ("" if resume else " with --resume auto") + \
        " resumes it from its last checkpoint"
    [(_, outcome)] = run_jobs(cc, run.jobs, [(run.path.name, job)], say, cc.nodes, tasks,
                              again)
    if isinstance(outcome, BaseException):
        raise outcome
    if not run.finished():
        raise JobFailed(f"job ended but {run.path} has not finished ({run.eval_report} is "
                        f"missing); its output is in {run.jobs}")
    return dataclasses.replace(finished_result(run, cfg), already_finished=False)
