"""A run directory written by resnetlab 0.1.0 (commit 5bd3c6a, before the house redesign)
still loads and resumes.

tests/fixtures/run-0.1.0 is that code's smoke run (resnet8, fp32, `--set checkpoint_every=5`)
on the synthetic Fashion-MNIST files of conftest.synthetic_images, killed by SIGKILL after
iteration 10: config.yaml, metrics.jsonl, summary.csv, checkpoints/latest and
checkpoints/ckpt-00000010 (weights + trainer state), as the old layout wrote them. Its
config names the data folder relatively (`fashion-data`), so a test recreates the files
there and runs from that folder.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import resnetlab
from resnetlab.cli import main
from resnetlab.deploy.predict import Predictor
from resnetlab.train.checkpoint import load_checkpoint
from resnetlab.train.report import MetricsLog
from resnetlab.train.rundir import RunDir, weights_dir

from .conftest import synthetic_images, write_idx

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"
SETS = ["data.data_dir=fashion-data", "data.verify=false", "precision=fp32",
        "checkpoint_every=5"]


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunDir:
    """A copy of the old run directory, beside the data it was trained on."""
    data = tmp_path / "fashion-data"
    data.mkdir()
    for split, n, seed in (("train", 640, 1), ("t10k", 256, 2)):
        images, labels = synthetic_images(n, seed)
        write_idx(data / f"{split}-images-idx3-ubyte", images)
        write_idx(data / f"{split}-labels-idx1-ubyte", labels)
    shutil.copytree(FIXTURE, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return RunDir(tmp_path / "run")


def _train(out: Path, resume: bool) -> int:
    return main(["train", "--preset", "smoke", *(f"--set={s}" for s in SETS), "--out",
                 str(out), "--resume", "auto" if resume else "no"])


# The fixture's CPU (an AVX2 EPYC) ran oneDNN's and ATen's AVX2 kernels. Wider ones round
# differently, and 10 more steps amplify that: on an AVX-512 Zen 4 the loss differed by
# 7e-6 at iteration 5, 2.7e-4 at 10 and the weights by 0.20 at 20, as far apart as a
# resume that loses the momentum (0.26). Capped at AVX2 (as test_precision emulates an
# AVX2 CPU) any x86 CPU reproduces the fixture's losses exactly.
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def _train_as_avx2(out: Path, resume: bool) -> None:
    args = ["train", "--preset", "smoke", *(f"--set={s}" for s in SETS), "--out", str(out),
            "--resume", "auto" if resume else "no"]
    proc = subprocess.run([sys.executable, "-m", "resnetlab", *args], capture_output=True,
                          text=True, timeout=600, env={**os.environ, **AVX2})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_old_checkpoint_and_weights_load(old_run: RunDir) -> None:
    ckpt = old_run.latest_checkpoint()
    assert ckpt == old_run.checkpoints / "ckpt-00000010"
    assert weights_dir(old_run.path) == ckpt  # no final/ yet: the newest checkpoint
    model = resnetlab.load_model(ckpt)
    assert model.model_config.architecture == "resnet8" and model.num_classes == 10
    state = load_checkpoint(ckpt, model)
    assert (state["iteration"], state["epoch"], state["batch_in_epoch"]) == (10, 0, 10)
    assert len(state["optimizer"]["state"]) == len(list(model.parameters()))
    probs = Predictor(old_run.path, "torch", "fp32").model(torch.zeros(1, 1, 28, 28))
    assert probs.shape == (1, 10)


def test_old_run_resumes_to_the_end_as_an_uninterrupted_run(old_run: RunDir) -> None:
    """Resumed at iteration 10 from the old files, it ends where today's code ends when it
    trains all 20 iterations at once, both on AVX2 kernels as the fixture's CPU (AVX2 above).
    The first 10 came from another build, so the weights are compared to float32 rounding,
    not bit for bit (on the fixture's CPU they were identical: sha256 of both final weights
    75692cf0...). A resume that dropped the optimizer's momentum ended 0.26 away (measured
    by making SGD.load_state_dict a no-op)."""
    _train_as_avx2(old_run.path, resume=True)
    iterations = [r["iteration"] for r in MetricsLog(old_run).records() if r["kind"] == "train"]
    assert iterations == list(range(5, 21, 5))  # the old lines kept, the rest appended
    assert old_run.finished() and old_run.latest_checkpoint() == old_run.checkpoint(20)
    _train_as_avx2(old_run.path.parent / "fresh", resume=False)
    a = load_file(old_run.final / "model.safetensors")
    b = load_file(old_run.path.parent / "fresh" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    assert worst < 1e-3, worst
    assert _train(old_run.path, resume=True) == 0  # finished: re-reported, not retrained
