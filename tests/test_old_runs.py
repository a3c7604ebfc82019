"""A run directory written by resnetlab 0.1.0 (commit 5bd3c6a, before the house redesign)
still loads and resumes.

tests/fixtures/run-0.1.0 is that code's smoke run (resnet8, fp32, `--set checkpoint_every=5`)
on the synthetic Fashion-MNIST files of conftest.synthetic_images, killed by SIGKILL after
iteration 10: config.yaml, metrics.jsonl, summary.csv, checkpoints/latest and
checkpoints/ckpt-00000010 (weights + trainer state), as the old layout wrote them. Its
config names the data folder relatively (`fashion-data`), so a test recreates the files
there and runs from that folder.
"""

import copy
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import resnetlab
from resnetlab.cli import main
from resnetlab.config import resolve
from resnetlab.deploy.predict import Predictor
from resnetlab.report import MetricsLog
from resnetlab.runs import STATE_FILE, RunDir, weights_dir
from resnetlab.train import loop
from resnetlab.train.checkpoint import load_checkpoint
from resnetlab.train.schedule import LRSchedule
from resnetlab.train.setup import TrainState, make_optimizer

from .conftest import synthetic_images, write_fashion_files

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"
SETS = ["data.data_dir=fashion-data", "data.verify=false", "precision=fp32",
        "checkpoint_every=5"]


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RunDir:
    """A copy of the old run directory, beside the data it was trained on."""
    (tmp_path / "fashion-data").mkdir()
    write_fashion_files(tmp_path / "fashion-data", synthetic_images)
    shutil.copytree(FIXTURE, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    return RunDir(tmp_path / "run")


def _train(out: Path, resume: bool) -> int:
    return main(["train", "--preset", "smoke", *(f"--set={s}" for s in SETS), "--out",
                 str(out), "--resume", "auto" if resume else "no"])


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


@dataclass
class Restored:
    """The trainer's state as `TrainState.restore` left it, and its first step after that."""

    it: int = -1
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    rng: torch.Tensor | None = None
    # (x, y, lr, loss, parameters before, parameters after), parameters in the optimizer's order
    step: tuple[torch.Tensor, torch.Tensor, float, float, list[torch.Tensor],
                list[torch.Tensor]] | None = None


def _watch_the_resume(monkeypatch: pytest.MonkeyPatch) -> Restored:
    """Record what the restored trainer holds, then its first step: batch, lr, loss and the
    weights after it. Only that first step is compared with the checkpoint: it depends on
    the saved state and on float32 rounding alone, where steps after it amplify the kernel
    rounding of whichever CPU runs them (10 steps on an AMX Xeon ended 0.26 from an AVX2
    EPYC's, as far as a lost momentum)."""
    seen = Restored()
    restore, step = TrainState.restore, loop.train_step

    def watched_restore(self: TrainState) -> None:
        restore(self)
        seen.it, seen.rng = self.it, torch.get_rng_state()
        seen.weights = {k: v.detach().clone() for k, v in self.core.state_dict().items()}
        seen.optimizer = copy.deepcopy(self.opt.state_dict())
        seen.schedule = self.sched.state_dict()

    def watched_step(model: nn.Module, opt: torch.optim.Optimizer, crit: nn.Module,
                     x: torch.Tensor, y: torch.Tensor, *args: Any, **kw: Any) -> Any:
        first = seen.step is None
        before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        loss, wrong = step(model, opt, crit, x, y, *args, **kw)
        if first:
            after = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
            seen.step = (x.clone(), y.clone(), opt.param_groups[0]["lr"], float(loss.detach()),
                         before, after)
        return loss, wrong

    monkeypatch.setattr(TrainState, "restore", watched_restore)
    monkeypatch.setattr(loop, "train_step", watched_step)
    return seen


def test_old_run_resumes_with_every_saved_tensor_restored(
        old_run: RunDir, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resumed from the old files, the trainer holds exactly what the checkpoint saved
    (weights and BN statistics, every momentum buffer, RNG, iteration, schedule), and its
    next step is the step that state defines, up to float32 rounding: recomputed here from
    the checkpoint's files alone, on whatever CPU runs the test. Guards a resume that drops
    any of them (e.g. SGD.load_state_dict as a no-op: no momentum, steps 75-100% off)."""
    ckpt = FIXTURE / "checkpoints" / "ckpt-00000010"  # the copy's is pruned as it resumes
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)
    seen = _watch_the_resume(monkeypatch)
    assert _train(old_run.path, resume=True) == 0

    assert seen.it == saved["iteration"] == 10
    weights = load_file(ckpt / "model.safetensors")
    assert weights.keys() == seen.weights.keys()
    for k, v in weights.items():
        assert torch.equal(seen.weights[k].contiguous(), v), k
    momentum = [s["momentum_buffer"] for s in saved["optimizer"]["state"].values()]
    restored = [s["momentum_buffer"] for s in seen.optimizer["state"].values()]
    assert len(restored) == len(momentum) == len(list(resnetlab.load_model(ckpt).parameters()))
    assert all(torch.equal(a, b) for a, b in zip(restored, momentum, strict=True))
    assert torch.equal(seen.rng, saved["rng"])
    assert seen.schedule == saved["schedule"]

    # The first resumed step, recomputed from the checkpoint: its weights, its optimizer
    # state and the schedule's lr at iteration 10, in plain PyTorch (no fused kernels).
    assert seen.step is not None
    x, y, lr, loss, before, after = seen.step
    cfg = resolve("smoke", old_run.config, [f"data.data_dir={old_run.path.parent}"])
    assert lr == pytest.approx(LRSchedule(cfg.schedule, cfg.optim.lr)(10), rel=1e-12)
    model = resnetlab.load_model(ckpt).train()
    opt = make_optimizer(model, cfg)
    opt.load_state_dict(saved["optimizer"])
    for g in opt.param_groups:
        g["lr"] = lr
    ref = nn.CrossEntropyLoss()(model(x.contiguous()), y)
    # Two kernel orders on one CPU round apart by float32's 1e-7 of a loss near 2.3.
    assert loss == pytest.approx(ref.item(), rel=1e-5)
    opt.zero_grad()
    ref.backward()
    opt.step()
    params = [p.detach() for g in opt.param_groups for p in g["params"]]
    # Per tensor, how far the trainer's step lands from this one, as a fraction of the step.
    # Measured (AMD EPYC Zen 2, fp32; fused BN kernels against plain PyTorch): at most 0.003
    # over the 23 tensors; with a fresh momentum (the bug) at least 0.75. 0.05 sits 17x
    # above the one and 15x below the other.
    off = [float((a - r).abs().max() / (a - b).abs().max())
           for a, r, b in zip(after, params, before, strict=True)]
    assert max(off) < 0.05, off

    iterations = [r["iteration"] for r in MetricsLog(old_run).records() if r["kind"] == "train"]
    assert iterations == list(range(5, 21, 5))  # the old lines kept, the rest appended
    assert old_run.finished() and old_run.latest_checkpoint() == old_run.checkpoint(20)
    assert _train(old_run.path, resume=True) == 0  # finished: re-reported, not retrained
