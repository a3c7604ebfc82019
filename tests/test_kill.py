"""Hard kills: a SIGKILLed run resumes bit-identically; a save killed midway loses nothing."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import resnetlab
from resnetlab.config import resolve
from resnetlab.report import MetricsLog
from resnetlab.runs import RunDir
from resnetlab.train.checkpoint import load_checkpoint
from resnetlab.train.loop import KILL_AT_ENV, train

# 16 batches an epoch (512 examples, batch 32): checkpoints every 3 iterations fall
# mid-epoch, and the evaluation at each epoch end (16, 32) saves one on the boundary.
SETS = ["data.verify=false", "schedule.iterations=40", "eval_every=16", "checkpoint_every=3",
        "log_every=4", "ema_decay=0.9", "optim.lookahead=true"]
# In-memory batches (no loader workers) and an image folder read by 2 DataLoader workers.
KINDS = {"memory-0-workers": [],
         "folder-2-workers": ["data.dataset=folder", "data.image_size=28", "data.workers=2"]}


def _run(data_dir: Path, out: Path, extra: list[str], log: Path,
         kill_at: int | None = None) -> int:
    """One `resnetlab train` process; with `kill_at`, it SIGKILLs itself at that step
    boundary (loop.KILL_AT_ENV). Returns its exit code; its stderr goes to `log`."""
    cmd = [sys.executable, "-m", "resnetlab", "train", "--preset", "smoke", "--data-dir",
           str(data_dir), "--out", str(out), "--resume", "auto",
           *[f"--set={s}" for s in [*SETS, *extra]]]
    env = {**os.environ, KILL_AT_ENV: str(kill_at or "")}
    with log.open("a") as err:
        return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env,
                              timeout=300).returncode


def _state(run: Path) -> dict:
    ckpt = RunDir(run).latest_checkpoint()
    assert ckpt is not None
    return torch.load(ckpt / "trainer_state.pt", weights_only=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_mid_epoch_and_at_epoch_boundary_then_resume_is_bit_identical(
        tmp_path: Path, fashion_dir: Path, folder_dir: Path, kind: str) -> None:
    extra = KINDS[kind]
    data_dir = folder_dir if extra else fashion_dir
    reference = train(resolve("smoke", sets=[f"data.data_dir={data_dir}", *SETS, *extra]),
                      tmp_path / "reference", progress=False)
    out, log = tmp_path / "killed", tmp_path / "stderr.txt"
    # Killed 2 steps after the mid-epoch checkpoint at 6: those steps are lost and redone.
    assert _run(data_dir, out, extra, log, kill_at=8) == -signal.SIGKILL, log.read_text()
    state = _state(out)
    assert (state["iteration"], state["epoch"], state["batch_in_epoch"]) == (6, 0, 6)
    # Resumed mid-epoch, then killed right after the checkpoint of the epoch's end.
    assert _run(data_dir, out, extra, log, kill_at=16) == -signal.SIGKILL, log.read_text()
    state = _state(out)
    assert (state["iteration"], state["epoch"], state["batch_in_epoch"]) == (16, 1, 0)
    assert _run(data_dir, out, extra, log) == 0, log.read_text()  # from the boundary on
    a, b = load_file(reference.weights / "model.safetensors"), \
        load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = _state(tmp_path / "reference"), _state(out)
    assert sa["iteration"] == sb["iteration"] == 40
    assert sa["recent_errors"] == sb["recent_errors"]
    if not extra:  # DataLoader iterators draw base seeds from it (unused: SeededSubset)
        assert torch.equal(sa["rng"], sb["rng"])
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert sa["ema"].keys() == sb["ema"].keys()
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])
    floats = {k for k, v in a.items() if v.is_floating_point()}  # the model's, as saved
    assert sa["lookahead"].keys() == sb["lookahead"].keys() == floats
    assert all(torch.equal(sa["lookahead"][k], sb["lookahead"][k]) for k in sa["lookahead"])
    # The log has each logged iteration once, as the uninterrupted run has it.
    logged = [(r["kind"], r["iteration"]) for r in MetricsLog(RunDir(out)).records()]
    assert logged == [(r["kind"], r["iteration"])
                      for r in MetricsLog(RunDir(tmp_path / "reference")).records()]


def test_resume_with_another_batch_stream_differs(tmp_path: Path, fashion_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the equality above is sensitive to the data stream it restores."""
    cfg = resolve("smoke", sets=[f"data.data_dir={fashion_dir}", *SETS,
                                 "schedule.iterations=12"])
    reference = train(cfg, tmp_path / "reference", progress=False)
    out = tmp_path / "cut"
    from resnetlab.train.schedule import LRSchedule

    original = LRSchedule.__call__

    def stop_at_7(self: LRSchedule, it: int) -> float:
        if it == 7:
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(LRSchedule, "__call__", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    monkeypatch.setattr(LRSchedule, "__call__", original)
    import resnetlab.data.memory as memory

    shifted = memory.batch_generator
    monkeypatch.setattr(memory, "batch_generator", lambda s, e, b=-1: shifted(s + 1, e, b))
    resumed = train(cfg, out, resume=True, progress=False)
    a = load_file(reference.weights / "model.safetensors")
    b = load_file(resumed.weights / "model.safetensors")
    assert not all(torch.equal(a[k], b[k]) for k in a)


SAVER = '''
import sys, torch
from pathlib import Path
import resnetlab
from resnetlab.train.checkpoint import save_checkpoint
from resnetlab.runs import RunDir
run = RunDir(sys.argv[1])
model = resnetlab.create_model("resnet8")
i = int(sys.argv[2])
while True:
    i += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(i)
    save_checkpoint(run, model, {"iteration": i, "rng": torch.get_rng_state()}, None, {})
'''


def _saved_iteration(run: RunDir) -> int:
    """The iteration `latest` names, read once (-1 if none yet): while the saver runs, a
    second read could find the first one's checkpoint already pruned."""
    ckpt = run.latest_checkpoint()
    return -1 if ckpt is None else int(ckpt.name.split("-")[1])


def test_saves_killed_at_random_moments_always_leave_a_complete_checkpoint(
        tmp_path: Path) -> None:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    run = RunDir(tmp_path / "run")
    root = run.checkpoints
    rng = random.Random(0)
    last = 0
    savers: list[subprocess.Popen] = []
    try:
        for _ in range(8):
            proc = subprocess.Popen([sys.executable, str(script), str(run.path), str(last)])
            savers.append(proc)
            while _saved_iteration(run) <= last:
                assert proc.poll() is None
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            ckpt = run.latest_checkpoint()
            model = resnetlab.create_model("resnet8")
            state = load_checkpoint(ckpt, model)  # loads: complete, not torn
            assert all(torch.all(p == state["iteration"]) for p in model.parameters())
            assert state["iteration"] > last
            last = state["iteration"]
        # The next successful save cleans what killed saves left behind.
        leftovers = {p.name for p in root.iterdir() if p.name.startswith(".")}
        proc = subprocess.Popen([sys.executable, str(script), str(run.path), str(last)])
        savers.append(proc)
        while _saved_iteration(run) <= last + 1:
            time.sleep(0.01)
    finally:  # a saver saves forever: none may outlive the test, pass or fail
        for proc in savers:
            proc.kill()
            proc.wait()
    assert not leftovers & {p.name for p in root.iterdir()}
    assert len([p for p in root.iterdir() if p.name.startswith("ckpt-")]) <= 2


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigterm_stops_training_at_a_checkpoint(tmp_path: Path, fashion_dir: Path,
                                                folder_dir: Path, kind: str) -> None:
    """SIGTERM stops `resnetlab train` as Ctrl-C does: a checkpoint at the step it stopped at
    (the run has no other: its first evaluation would be at its end) and exit 130, where it
    used to die with its steps. In memory: `kill PID`; an image folder read by 2 DataLoader
    workers: the whole process group, as a machine shutting down signals every process."""
    out, extra = tmp_path / "run", KINDS[kind]
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "train", "--preset", "smoke", "--data-dir",
         str(folder_dir if extra else fashion_dir), "--out", str(out),
         *[f"--set={s}" for s in ["data.verify=false", "schedule.iterations=100000",
                                  "eval_every=100000", "log_every=2", *extra]]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def stop_all() -> str:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate()[1]

    try:
        deadline = time.monotonic() + 120
        while not (RunDir(out).metrics.is_file() and RunDir(out).metrics.stat().st_size):
            assert proc.poll() is None and time.monotonic() < deadline, stop_all()
            time.sleep(0.2)
        if extra:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        stop_all()
    assert proc.returncode == 130, err
    logged = max(r["iteration"] for r in MetricsLog(RunDir(out)).records())
    assert _state(out)["iteration"] >= logged >= 2


@pytest.mark.slow  # about 30 s on 2 cores: `make test-slow`
def test_sigterm_to_train_nproc_leaves_no_rank_behind(tmp_path: Path, fashion_dir: Path) -> None:
    """`kill PID` of `train --nproc 2` reaches torchrun and its ranks: none trains on as an
    orphan holding the run's lock (each used to, until it finished)."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "resnetlab", "train", "--nproc", "2", "--preset", "smoke",
         "--data-dir", str(fashion_dir), "--out", str(out),
         *[f"--set={s}" for s in ["data.verify=false", "schedule.iterations=100000",
                                  "eval_every=100000", "log_every=2"]]],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def ours() -> list[str]:
        found = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
        return [p for p in found.stdout.split() if int(p) != proc.pid]

    try:
        deadline = time.monotonic() + 120
        while not (RunDir(out).metrics.is_file() and RunDir(out).metrics.stat().st_size):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the CLI process alone, as `kill PID` does
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 30
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert ours() == []
    finally:  # torchrun starts its ranks in sessions of their own: each is killed by pid
        for pid in [proc.pid, *map(int, ours())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.communicate()
