"""Hard kills: a SIGKILLed run resumes bit-identically; a save killed midway loses nothing."""

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
from resnetlab.train.checkpoint import latest_checkpoint, load_checkpoint
from resnetlab.train.config import resolve
from resnetlab.train.loop import train

# 16 batches an epoch (512 examples, batch 32): checkpoints every 3 iterations fall
# mid-epoch, and the evaluation at each epoch end (16, 32) saves one on the boundary.
SETS = ["data.verify=false", "schedule.iterations=40", "eval_every=16", "checkpoint_every=3",
        "log_every=4", "ema_decay=0.9"]
# In-memory batches (no loader workers) and an image folder read by 2 DataLoader workers.
KINDS = {"memory-0-workers": [],
         "folder-2-workers": ["data.dataset=folder", "data.image_size=28", "data.workers=2"]}


def _start(data_dir: Path, out: Path, extra: list[str]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "resnetlab", "train", "--preset", "smoke", "--data-dir",
           str(data_dir), "--out", str(out), "--resume", "auto",
           *[f"--set={s}" for s in [*SETS, *extra]]]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_after(proc: subprocess.Popen[bytes], ckpts: Path, at_least: int,
                delay: float) -> int:
    """SIGKILL `proc` `delay` s after its latest checkpoint reaches `at_least`."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        latest = latest_checkpoint(ckpts)
        if latest is not None and int(latest.name.split("-")[1]) >= at_least:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return int(latest.name.split("-")[1])
        if proc.poll() is not None:
            raise AssertionError("the run ended before it could be killed")
        time.sleep(0.005)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("kind", list(KINDS))
def test_sigkill_mid_epoch_and_at_epoch_boundary_then_resume_is_bit_identical(
        tmp_path: Path, fashion_dir: Path, folder_dir: Path, kind: str) -> None:
    extra = KINDS[kind]
    data_dir = folder_dir if extra else fashion_dir
    rng = random.Random(kind)
    reference = train(resolve("smoke", sets=[f"data.data_dir={data_dir}", *SETS, *extra]),
                      tmp_path / "reference", progress=False)
    out = tmp_path / "killed"
    ckpts = out / "checkpoints"
    killed_at = []
    for target in (rng.choice([3, 6, 9]), 16):  # mid-epoch, then the epoch boundary
        killed_at.append(_kill_after(_start(data_dir, out, extra), ckpts, target,
                                     rng.uniform(0, 0.2)))
    final = _start(data_dir, out, extra)
    assert final.wait(timeout=300) == 0
    assert killed_at[0] % 16 and killed_at[1] >= 16
    a, b = load_file(reference.weights / "model.safetensors"), \
        load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(latest_checkpoint(tmp_path / "reference" / "checkpoints") /
                    "trainer_state.pt", weights_only=True)
    sb = torch.load(latest_checkpoint(ckpts) / "trainer_state.pt", weights_only=True)
    assert sa["iteration"] == sb["iteration"] == 40 and sa["schedule"] == sb["schedule"]
    for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(),
                    strict=True):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert sa["ema"].keys() == sb["ema"].keys()
    assert all(torch.equal(sa["ema"][k], sb["ema"][k]) for k in sa["ema"])


def test_resume_with_another_batch_stream_differs(tmp_path: Path, fashion_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the equality above is sensitive to the data stream it restores."""
    cfg = resolve("smoke", sets=[f"data.data_dir={fashion_dir}", *SETS,
                                 "schedule.iterations=12"])
    reference = train(cfg, tmp_path / "reference", progress=False)
    out = tmp_path / "cut"
    import resnetlab.train.loop as loop

    original = loop.LRSchedule.__call__

    def stop_at_7(self: loop.LRSchedule, it: int) -> float:
        if it == 7:
            raise KeyboardInterrupt
        return original(self, it)

    monkeypatch.setattr(loop.LRSchedule, "__call__", stop_at_7)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out, progress=False)
    monkeypatch.setattr(loop.LRSchedule, "__call__", original)
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
root = Path(sys.argv[1])
model = resnetlab.create_model("resnet8")
i = int(sys.argv[2])
while True:
    i += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(i)
    save_checkpoint(root, model, {"iteration": i, "rng": torch.get_rng_state()}, None, {})
'''


def test_saves_killed_at_random_moments_always_leave_a_complete_checkpoint(
        tmp_path: Path) -> None:
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    root = tmp_path / "ckpts"
    rng = random.Random(0)
    last = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, str(script), str(root), str(last)])
        while latest_checkpoint(root) is None or \
                int(latest_checkpoint(root).name.split("-")[1]) <= last:
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(root)
        model = resnetlab.create_model("resnet8")
        state = load_checkpoint(ckpt, model)  # loads: complete, not torn
        assert all(torch.all(p == state["iteration"]) for p in model.parameters())
        assert state["iteration"] > last
        last = state["iteration"]
    # The next successful save cleans what killed saves left behind.
    leftovers = {p.name for p in root.iterdir() if p.name.startswith(".")}
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(last)])
    while int(latest_checkpoint(root).name.split("-")[1]) <= last + 1:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not leftovers & {p.name for p in root.iterdir()}
    assert len([p for p in root.iterdir() if p.name.startswith("ckpt-")]) <= 2
