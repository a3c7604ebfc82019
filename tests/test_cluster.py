"""`--executor` (resnetlab.cluster): sub-runs and training jobs through submitit, on its
debug and local executors and on SLURM, whose commands a fake of one machine stands in for
(tests/fake_slurm.py): the sbatch script, the job array, requeue after pre-emption, status,
and a two-node data-parallel job, each ending where a run in this process ends."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import resnetlab
from resnetlab import cluster
from resnetlab.cli import main
from resnetlab.config import ClusterConfig, resolve, resolve_cluster
from resnetlab.errors import ConfigError
from resnetlab.reproduce import run_experiment
from resnetlab.runs import RunDir, hold
from resnetlab.train.loop import train

from . import fake_slurm
from .conftest import Variant
from .test_distributed import SETS as DDP_SETS
from .test_distributed import TOLERANCE, _max_diff

SMOKE = ("data.verify=false",)
LABELS = ("resnet8", "resnet14", "plain8", "plain14")


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake SLURM's commands first on PATH; returns its state folder."""
    import submitit

    state = tmp_path / "slurm-state"
    for key, value in fake_slurm.install(tmp_path / "slurm-bin", state).items():
        monkeypatch.setenv(key, value)
    yield state
    submitit.SlurmJob.watcher.clear()  # one watcher per process caches states by job id


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path) -> Path:
    """The smoke degradation experiment in this process on 1 thread, as each job below
    runs (--cpus-per-task 1): the thread count changes float rounding."""
    out = tmp_path_factory.mktemp("one-thread")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_experiment("degradation", "smoke", out, str(fashion_dir), SMOKE, progress=False)
    finally:
        torch.set_num_threads(threads)
    return out


def _errors(out: Path) -> dict:
    return json.loads((out / "degradation" / "results.json").read_text())["errors"]


def _same_weights(a: Path, b: Path) -> bool:
    sa, sb = (resnetlab.load_model(p).state_dict() for p in (a, b))
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def _status(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """`reproduce ... --status`: its lines after the experiment's heading."""
    capsys.readouterr()
    assert main([*argv, "--status"]) == 0
    return capsys.readouterr().out.splitlines()[1:]


def test_cluster_settings_come_from_the_file_section_then_the_flags(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(yaml.safe_dump({"cluster": {
        "executor": "slurm", "partition": "gpu", "time_limit_min": 60, "account": "lab",
        "setup": ["module load cuda"], "sbatch": {"constraint": "a100"}}}))
    cc = resolve_cluster(str(path), {"partition": "debug", "cpus_per_task": None})
    assert (cc.executor, cc.partition, cc.time_limit_min, cc.account, cc.cpus_per_task) == \
        ("slurm", "debug", 60, "lab", ClusterConfig().cpus_per_task)
    assert cc.setup == ["module load cuda"] and cc.sbatch == {"constraint": "a100"}
    assert resolve_cluster(None, {"gpus_per_node": 4}).tasks_per_node == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {partiton: gpu}\n")
    with pytest.raises(ConfigError, match="did you mean partition"):
        resolve_cluster(str(bad))
    bad.write_text("partition: gpu\n")
    with pytest.raises(ConfigError, match="one section, cluster:"):
        resolve_cluster(str(bad))
    with pytest.raises(ConfigError, match="needs --executor slurm"):
        resolve_cluster(None, {"executor": "local", "nodes": 2})
    with pytest.raises(ConfigError, match="must be >= 1"):
        resolve_cluster(None, {"time_limit_min": 0})


def test_resource_flags_without_an_executor_and_no_submitit_say_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
        ) -> None:
    argv = ["reproduce", "degradation", "--scale", "smoke", "--out", str(tmp_path)]
    assert main([*argv, "--partition", "gpu"]) == 2
    assert "--partition needs --executor" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    assert main([*argv, "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'resnetlab[cluster]'" in err
    assert not (tmp_path / "runs").exists()


def test_settings_an_executor_would_ignore_are_refused_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"cluster": {"partition": "gpu"}}))
    argv = ["reproduce", "degradation", "--scale", "smoke", "--out", str(tmp_path / "out")]
    for flags, says in [
            (["--executor", "local", "--partition", "gpu"], "--partition is for --executor slurm"),
            (["--executor", "debug", "--time-limit", "9"], "--time-limit is for --executor slurm"),
            (["--executor", "local", "--jobs", "2"], "--jobs runs sub-runs in processes here"),
            (["--cluster-config", str(site)], "names no executor"),
            (["--executor", "slurm", "--gpus-per-node", "2"], "each reproduce sub-run is one")]:
        assert main([*argv, *flags]) == 2, flags
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and says in err, (flags, err)
    assert not (tmp_path / "out").exists()


def test_jobs_of_unknown_state_or_held_folders_are_not_submitted_again(
        tmp_path: Path, fashion_dir: Path, slurm: Path) -> None:
    """A job jobs.json names and SLURM no longer (or not yet) reports may still train into
    its run directory: refused, naming it. Two calls never submit from one folder at once,
    and sbatch's refusal is one line."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    (folder / cluster.JOBS_FILE).write_text(json.dumps(
        {"resnet8": {"executor": "slurm", "job_id": "4242_0"}}))
    cfg = resolve("smoke", sets=[f"data.data_dir={fashion_dir}", *SMOKE])
    job = [("resnet8", cluster.TrainJob(cfg, str(tmp_path / "run")))]
    cc = resolve_cluster(None, {"executor": "slurm"})
    with pytest.raises(ConfigError, match=r"job 4242_0 from an earlier call is unknown "
                       r"\(squeue -j 4242_0"):
        list(cluster.run_jobs(cc, folder, job))
    with hold(folder / ".lock", folder), pytest.raises(ConfigError, match="is in use by pid"):
        list(cluster.run_jobs(cc, folder, [("resnet14", job[0][1])]))
    refused = resolve_cluster(None, {"executor": "slurm", "partition": "missing"})
    with pytest.raises(ConfigError, match="slurm refused the job: sbatch: error: Batch job "
                       "submission failed: Invalid partition name"):
        list(cluster.run_jobs(refused, folder, [("resnet14", job[0][1])]))
    assert not (slurm / "scripts").exists()  # nothing was submitted
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("executor", ["local", "debug"])
def test_local_and_debug_jobs_give_the_numbers_of_a_run_in_this_process(
        executor: str, tmp_path: Path, fashion_dir: Path, one_thread: Path) -> None:
    """local: processes on this machine, at most --array-parallelism at once; debug: in
    this process. Each sub-run ends bit-identical to one trained here on as many threads."""
    cc = resolve_cluster(None, {"executor": executor, "cpus_per_task": 1,
                                "array_parallelism": 2})
    run_experiment("degradation", "smoke", tmp_path, str(fashion_dir), SMOKE, progress=False,
                   cluster=cc)
    assert _errors(tmp_path) == _errors(one_thread)
    for label in LABELS:
        assert _same_weights(tmp_path / "runs" / label / "final",
                             one_thread / "runs" / label / "final")
    results = json.loads((tmp_path / "degradation" / "results.json").read_text())
    assert results["executor"] == executor
    assert f"--executor {executor}" in (tmp_path / "degradation" / "report.md").read_text()
    if executor == "local":
        jobs = cluster.read_jobs(tmp_path / "jobs")
        assert sorted(jobs) == sorted(LABELS)
        assert len({j["job_id"] for j in jobs.values()}) == 4  # a process each
        import submitit  # each job sees the GPUs this shell sees, though it asked for none

        pickled = tmp_path / "jobs" / f"{jobs['resnet8']['job_id']}_submitted.pkl"
        assert submitit.core.utils.pickle_load(pickled).function.gpus_seen == \
            os.environ.get("CUDA_VISIBLE_DEVICES", cluster._NO_GPU_SETTING)


def test_sub_runs_as_one_slurm_array_give_the_numbers_of_a_run_in_this_process(
        tmp_path: Path, fashion_dir: Path, one_thread: Path, slurm: Path,
        capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"cluster": {
        "account": "lab", "setup": ["export RESNETLAB_SITE=1"],
        "sbatch": {"constraint": "cpu"}}}))
    out = tmp_path / "out"
    argv = ["reproduce", "degradation", "--scale", "smoke", "--out", str(out), "--data-dir",
            str(fashion_dir), "--set", SMOKE[0]]
    assert main([*argv, "--executor", "slurm", "--cluster-config", str(site), "--partition",
                 "cpu-short", "--time-limit", "30", "--cpus-per-task", "1",
                 "--array-parallelism", "2"]) == 0
    assert any("submitted 4 jobs as SLURM array 1000 (at most 2 at once)" in r.message
               for r in caplog.records)
    script = (slurm / "scripts" / "1000.sh").read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --partition=cpu-short",
                 "#SBATCH --time=30", "#SBATCH --cpus-per-task=1", "#SBATCH --account=lab",
                 "#SBATCH --constraint=cpu", "#SBATCH --signal=USR2@90",
                 "#SBATCH --ntasks-per-node=1", "export RESNETLAB_SITE=1"):
        assert line in script.splitlines(), line
    assert "gpus" not in script  # none asked for: no --gpus-per-node=0 for SLURM to refuse
    assert "srun" in script and "submitit.core._submit" in script
    assert _errors(out) == _errors(one_thread)
    for label in LABELS:
        assert _same_weights(out / "runs" / label / "final",
                             one_thread / "runs" / label / "final")
    jobs = cluster.read_jobs(out / "jobs")
    assert {k: v["job_id"] for k, v in jobs.items()} == {
        label: f"1000_{i}" for i, label in enumerate(LABELS)}
    status = _status(argv, capsys)
    assert len(status) == 4 and all(": done, test error " in s for s in status)


@pytest.mark.slow  # 24 s on 2 cores: `make test-slow`
def test_status_says_pending_and_failed_without_waiting(
        tmp_path: Path, fashion_dir: Path, slurm: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    """The jobs held in the queue read pending; one cancelled reads failed, the command
    that waits for them fails naming it, and the others finish."""
    out = tmp_path / "out"
    argv = ["reproduce", "degradation", "--scale", "smoke", "--out", str(out), "--data-dir",
            str(fashion_dir), "--set", SMOKE[0]]
    env = {**os.environ, "FAKE_SLURM_HOLD": "1"}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", *argv, "--executor", "slurm", "--cpus-per-task",
         "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "jobs" / cluster.JOBS_FILE).exists():
            assert waiting.poll() is None and time.monotonic() < deadline, \
                waiting.communicate()[0]
            time.sleep(0.5)
        status = _status(argv, capsys)
        assert status == [f"  [{i + 1}/4] {label}: pending (slurm job 1000_{i})"
                          for i, label in enumerate(LABELS)]
        subprocess.run(["scancel", "1000_1"], check=True)
        fake_slurm.release(["1000"])
        said, _ = waiting.communicate(timeout=240)
    finally:
        waiting.kill()
    assert waiting.returncode == 2 and "[2/4] resnet14: failed" in said, said
    status = _status(argv, capsys)
    assert "resnet14: failed (slurm job 1000_1)" in status[1]
    assert all(": done, test error " in status[i] for i in (0, 2, 3))
    # A state SLURM reports for a job that has no result yet reads as such.
    fake_slurm._update("1001", state="RUNNING", restarts=0, pids=[])
    assert cluster.job_state(out / "jobs", {"executor": "slurm", "job_id": "1001"}) == "running"


def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_run(
        tmp_path: Path, fashion_dir: Path, slurm: Path) -> None:
    """SLURM signals the job (SIGTERM, then USR2, as submitit's own test does) after its
    first checkpoint; submitit requeues it, and the second start resumes from that
    checkpoint to the same weights as a run never interrupted (1 thread both)."""
    import submitit

    cfg = resolve("smoke", sets=[f"data.data_dir={fashion_dir}", *SMOKE, "precision=fp32",
                                 "schedule.iterations=200", "checkpoint_every=5"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = train(cfg, tmp_path / "reference", progress=False)
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    cc = resolve_cluster(None, {"executor": "slurm", "cpus_per_task": 1})

    def preempt() -> None:
        while not RunDir(run).pointer.exists():
            time.sleep(0.05)
        submitit.SlurmJob(RunDir(run).jobs, "1000")._interrupt(timeout=False)

    signaller = threading.Thread(target=preempt, daemon=True)
    signaller.start()
    result = cluster.train_job(cc, cfg, run, resume=False)
    signaller.join(timeout=10)
    job = fake_slurm.read_job("1000")
    assert job["restarts"] == 1  # started twice
    log = "".join((RunDir(run).jobs / f"1000_0_log.{s}").read_text() for s in ("out", "err"))
    assert "this job is preempted" in log and "Requeued job 1000" in log
    assert log.count("resuming ") == 1 and "from iteration" in log
    assert result.test.top1_error == reference.test.top1_error and not result.already_finished
    assert _same_weights(run / "final", reference.weights)
    # Again: a finished run is reported, not submitted; --resume no is refused before sbatch.
    assert cluster.train_job(cc, cfg, run, resume=True).already_finished
    with pytest.raises(ConfigError, match="already holds a run; pass --resume auto"):
        cluster.train_job(cc, cfg, run, resume=False)
    assert not (slurm / "scripts" / "1001.sh").exists()


def test_a_job_slurm_requeues_itself_resumes_though_submitted_without_resume(
        tmp_path: Path, fashion_dir: Path, slurm: Path) -> None:
    """A node fails after the first checkpoint and SLURM requeues the job itself (no signal
    reaches submitit, so its pickle is the one first submitted): the rerun resumes, as
    `train --executor slurm` without --resume auto was checked before submitting."""
    cfg = resolve("smoke", sets=[f"data.data_dir={fashion_dir}", *SMOKE, "precision=fp32",
                                 "schedule.iterations=200", "checkpoint_every=5"])
    run = tmp_path / "run"
    cc = resolve_cluster(None, {"executor": "slurm", "cpus_per_task": 1})

    def node_fails() -> None:
        while not RunDir(run).pointer.exists():
            time.sleep(0.05)
        fake_slurm.scontrol(["requeue", "1000"])
        for pid in fake_slurm.read_job("1000")["pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    failing = threading.Thread(target=node_fails, daemon=True)
    failing.start()
    result = cluster.train_job(cc, cfg, run, resume=False)
    failing.join(timeout=10)
    assert fake_slurm.read_job("1000")["restarts"] == 1
    log = "".join((RunDir(run).jobs / f"1000_0_log.{s}").read_text() for s in ("out", "err"))
    assert "already holds a run" not in log and log.count("resuming ") == 1
    assert not result.already_finished and RunDir(run).finished()


@pytest.mark.stochastic(precisions=["fp32"])
def test_train_on_two_nodes_is_one_slurm_job_of_two_ranks(
        tmp_path: Path, fashion_dir: Path, slurm: Path, capsys: pytest.CaptureFixture[str],
        variant: Variant) -> None:
    """`train --executor slurm --nodes 2`: one job, one task per node; the ranks meet by
    the addresses submitit reads from SLURM's environment and train as torchrun's ranks do,
    within test_distributed's fp32 tolerance of one process."""
    out = tmp_path / "run"
    sets = [f"data.data_dir={fashion_dir}", *DDP_SETS, *variant.sets]
    assert main(["train", "--preset", "smoke", "--out", str(out), *[f"--set={s}" for s in sets],
                 "--executor", "slurm", "--nodes", "2", "--cpus-per-task", "1"]) == 0
    said = capsys.readouterr().out
    assert "submitted SLURM job 1000" in said and "test accuracy" in said
    script = (slurm / "scripts" / "1000.sh").read_text().splitlines()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert not any("--array" in ln for ln in script)
    for rank in (0, 1):  # one process per node, each told its place by SLURM's variables
        log = (RunDir(out).jobs / f"1000_{rank}_log.out").read_text()
        assert f"node={rank}(2), global_rank={rank}(2)" in log
    one = train(resolve("smoke", sets=sets), tmp_path / "one", progress=False)
    diff = _max_diff(resnetlab.load_model(one.weights).state_dict(),
                     resnetlab.load_model(out / "final").state_dict())
    variant.record(two_nodes=diff)
    assert diff < TOLERANCE
