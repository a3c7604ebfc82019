"""Issue 16, item 11: the README's multi-node launch, on one machine. Two torchrun agents
(one per "node", one rank each) meet through a c10d rendezvous on 127.0.0.1 and train one
job into one run directory: as one process would, across a kill and a resume, and through
an elastic restart when one agent dies."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab.config import resolve
from resnetlab.train.loop import train

from .test_distributed import SETS, TOLERANCE, _leftovers, _max_diff

KILLER = '''
import os, signal, sys
from resnetlab.train import setup
original = setup.TrainState.save
def save(self):
    original(self)  # the checkpoint is on disk (rank 0 wrote it; every rank waited)
    if self.it == int(os.environ.get("KILL_AGENT_AT", -1)) and os.environ["RANK"] == "1":
        os.kill(os.getppid(), signal.SIGKILL)  # this node's torchrun agent ...
        os.kill(os.getpid(), signal.SIGKILL)   # ... and its worker: the node is gone
setup.TrainState.save = save
from resnetlab.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_store(port: int, host: subprocess.Popen[str], timeout_s: float = 120) -> None:
    """Until `host` listens on `port`. A fixed wait lost the race on a loaded machine: the
    second agent bound the store first, and the elastic test then killed the store with it."""
    deadline = time.monotonic() + timeout_s
    while host.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the first torchrun agent never listened on port {port}")


def _agents(argv: list[str], cwd: Path, nnodes: str = "2", restarts: int = 0,
            env: dict[str, str] | None = None, env_b: dict[str, str] | None = None
            ) -> list[subprocess.CompletedProcess[str]]:
    """Two torchrun agents of one job, as `torchrun --nnodes=2 ...` on two machines."""
    port, job = _free_port(), f"job{time.monotonic_ns()}"
    base = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
            "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-id={job}",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--max-restarts={restarts}",
            "--rdzv-conf=join_timeout=60,last_call_timeout=10", *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    procs = [subprocess.Popen(base, env=env, cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)]
    _wait_for_store(port, procs[0])  # the first agent hosts the rendezvous store, as node1
    procs.append(subprocess.Popen(base, env={**env, **(env_b or {})}, cwd=cwd,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()  # after a timeout: no agent outlives the test
    return done


def _train_args(fashion_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "resnetlab", "train", "--preset", "smoke", "--data-dir", str(fashion_dir),
            "--out", str(out), "--resume", "auto",
            *[f"--set={s}" for s in [*SETS, "schedule.iterations=8", "checkpoint_every=2",
                                     *extra]]]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, fashion_dir: Path
                ) -> dict[str, torch.Tensor]:
    cfg = resolve("smoke", sets=[f"data.data_dir={fashion_dir}", *SETS,
                                 "schedule.iterations=8", "checkpoint_every=2"])
    res = train(cfg, tmp_path_factory.mktemp("single") / "run", progress=False)
    return resnetlab.load_model(res.weights).state_dict()


def test_two_nodes_train_and_resume_as_one_job(tmp_path: Path, fashion_dir: Path,
                                               one_process: dict[str, torch.Tensor]) -> None:
    out = tmp_path / "run"
    # The whole job killed at iteration 6 (after its checkpoint), as `scancel` would ...
    killed = _agents(_train_args(fashion_dir, out), tmp_path,
                     env={"RESNETLAB_KILL_AT_ITERATION": "6"})
    assert any(p.returncode != 0 for p in killed)
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-00000006"
    assert not (out / "final").exists()
    # ... and the same command on both nodes resumes it to the end.
    resumed = _agents(_train_args(fashion_dir, out), tmp_path)
    assert [p.returncode for p in resumed] == [0, 0], [p.stderr[-2000:] for p in resumed]
    said = resumed[0].stderr + resumed[1].stderr
    assert "resuming" in said and "from iteration 6" in said
    assert "test accuracy" in resumed[0].stdout + resumed[1].stdout
    iters = [json.loads(ln)["iteration"] for ln in (out / "metrics.jsonl").read_text()
             .splitlines()]
    assert iters == [2, 2, 4, 4, 6, 6, 8, 8]  # one writer, nothing twice
    assert _max_diff(one_process, resnetlab.load_model(out / "final").state_dict()) \
        < TOLERANCE
    assert _leftovers(str(out)) == []


@pytest.mark.slow  # 40 s on 2 cores: `make test-slow` (the two-node test above stays)
def test_an_elastic_job_goes_on_when_a_node_dies(tmp_path: Path, fashion_dir: Path,
                                                  one_process: dict[str, torch.Tensor]) -> None:
    """`--nnodes=1:2 --max-restarts=1`: the second agent and its worker are SIGKILLed right
    after the checkpoint at iteration 4; the first agent restarts its worker, which meets
    alone (world size 1), resumes from that checkpoint and finishes. The global batch is
    the same at any world size, so the weights are those of one process."""
    out = tmp_path / "run"
    launcher = tmp_path / "kill_node.py"
    launcher.write_text(KILLER)
    argv = [str(launcher), *_train_args(fashion_dir, out, "dist_timeout_s=30")[2:]]
    first, second = _agents(argv, tmp_path, nnodes="1:2", restarts=1,
                            env_b={"KILL_AGENT_AT": "4"})
    assert second.returncode == -9  # the dead node
    assert first.returncode == 0, first.stderr[-3000:]
    assert "from iteration 4" in first.stderr
    iters = [json.loads(ln)["iteration"] for ln in (out / "metrics.jsonl").read_text()
             .splitlines()]
    assert iters == [2, 2, 4, 4, 6, 6, 8, 8]
    assert _max_diff(one_process, resnetlab.load_model(out / "final").state_dict()) \
        < TOLERANCE
    assert _leftovers(str(out)) == []
