"""The training loop: plain functions over explicit objects.

The position in the data is a function of the iteration alone (every epoch has the same
number of batches and its order comes from (seed, epoch)), so a checkpoint needs only the
iteration, the weights, the optimizer, the schedule's state and the RNG to resume exactly.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import TrainConfig
from ..data import DataBundle
from ..errors import ResNetLabError
from ..evaluation.evaluate import EvalResult, evaluate
from ..models.factory import save_weights
from ..precision import Choice, device_name
from ..report import MetricsLog, plot_confusion, plot_curves
from ..runs import RunDir
from ..tables import format_duration
from .distributed import SINGLE_PROCESS, DistInfo, init_from_env, shutdown
from .setup import TrainState, checked_config, make_optimizer, start

log = logging.getLogger(__name__)
# A deterministic crash for the fault tests (tests/test_kill.py): the process SIGKILLs
# itself at the step boundary after this iteration, once that iteration's checkpoint (if
# any) is on disk, so a test chooses exactly where a run dies instead of racing a timer.
KILL_AT_ENV = "RESNETLAB_KILL_AT_ITERATION"
# Without a terminal (a log file, a batch job) there is no progress bar: a line this often.
PROGRESS_S = 30.0
ESTIMATE_STEPS = 10  # steps timed for the expected-time line
RATE_WINDOW_S = 600.0  # a progress line's time left: the speed of the last ten minutes


class NonFiniteLossError(ResNetLabError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    weights: Path
    curves: Path
    test: EvalResult
    iterations: int
    seconds: float | None  # training time over all resumes; None if the run did not record it
    already_finished: bool = False  # re-reported from the run's files, nothing trained


def train_step(model: nn.Module, opt: torch.optim.Optimizer, crit: nn.Module,
               x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               autocast: contextlib.AbstractContextManager[Any], dist: DistInfo = SINGLE_PROCESS,
               ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Forward, backward, clip, update. Returns (loss, wrong predictions); loss is None for a
    step skipped under `nonfinite=skip` (that check is the only host sync here, and all
    ranks agree on it, or the ones that stepped would wait forever for the others)."""
    with autocast:
        out = model(x)
        loss = crit(out.float(), y)
    wrong = (out.argmax(1) != y).sum()
    if cfg.nonfinite == "skip" and dist.sum(torch.isfinite(loss).float()).item() < dist.world:
        return None, wrong
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.optim.grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    opt.step()
    return loss, wrong


class _Window:
    """Loss and error sums kept on the device between log steps (no per-step host sync);
    read() sums them over all ranks."""

    def __init__(self, device: torch.device, dist: DistInfo) -> None:
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, wrong, count
        self.dist, self.t0 = dist, time.perf_counter()

    def add(self, loss: torch.Tensor, wrong: torch.Tensor, n: int) -> None:
        self.sums[0] += loss.detach().double() * n
        self.sums[1] += wrong
        self.sums[2] += n

    def read(self) -> tuple[float, float, float]:
        loss, wrong, n = self.dist.sum(self.sums).tolist()
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return loss / max(n, 1), wrong / max(n, 1), n / dt


def same_buffers(model: nn.Module, dist: DistInfo) -> None:
    """Rank 0's buffers on every rank. Without sync_bn each rank's last step updated its
    BatchNorm statistics from its own images; scored so, each shard would be scored by
    another model than the one rank 0 saves."""
    for b in model.buffers():
        dist.broadcast(b)


def _eval_splits(model: nn.Module, data: DataBundle, n_classes: int, with_test: bool,
                 dist: DistInfo, test_images: int = 0, tta: str = "center"
                 ) -> tuple[dict[str, Any], EvalResult | None]:
    """Val error, and test error if asked: of the first `test_images` (a fixed subset, for
    a dense curve; the batches that hold them) or, with 0, of the whole split, which is
    then returned for the final report. A folder without a test/ split tests on its
    validation images: they are scored once."""
    rec: dict[str, Any] = {"val_error": None, "test_error": None}
    same_buffers(model, dist)
    val = None
    if data.val is not None:
        val = evaluate(model, data.val.batches(0), n_classes, tta, reduce=dist.sum)
        rec["val_error"] = val.top1_error
    if not with_test:
        return rec, None
    if data.test is data.val and val is not None:
        rec["test_error"] = val.top1_error
        return rec, val
    batches = data.test.batches(0)
    if test_images:
        per_batch = data.test.batch_size
        batches = itertools.islice(batches, -(-test_images // per_batch))
    res = evaluate(model, batches, n_classes, tta, reduce=dist.sum)
    rec["test_error"] = res.top1_error
    if test_images:
        rec["test_images"] = res.count
        return rec, None
    return rec, res


def train(cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False,
          progress: bool | None = None) -> RunResult:
    """Train `cfg` into `run_dir`; with `resume`, continue from its latest checkpoint.

    Under torchrun each rank calls this; rank 0 alone writes files, and holds the run
    directory's lock meanwhile: a second process training into it is refused.
    """
    dist = init_from_env(cfg.dist_timeout_s)
    run = RunDir(run_dir)
    try:
        with run.lock() if dist.main else contextlib.nullcontext():
            return _train(cfg, run, resume, progress, dist)
    finally:
        shutdown(dist)


def _train(cfg: TrainConfig, run: RunDir, resume: bool, progress: bool | None,
           dist: DistInfo) -> RunResult:
    choice, saved = checked_config(cfg, run, resume, dist)
    if resume and run.finished():  # its checkpoints may be gone: final/ and eval.json stay
        return finished_result(run, cfg)
    metrics = MetricsLog(run, tensorboard=cfg.log.tensorboard)  # a missing package: now
    s = start(cfg, choice, run, resume, dist, saved)
    cfg, total = s.cfg, s.cfg.schedule.iterations
    if dist.main:
        metrics.truncate_after(s.it)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    # bf16 autocast: activations and weights in bf16 for the convolutions, BN statistics and
    # the loss in fp32 (the fused BN-ReLU kernels widen bf16 activations to fp32 in cache and
    # round once on the way out; docs/performance.md).
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) \
        if s.choice.precision == "bf16" else contextlib.nullcontext()
    show = sys.stderr.isatty() if progress is None else progress
    kill_at = int(os.environ.get(KILL_AT_ENV) or -1)
    bar = tqdm(total=total, initial=s.it, unit="it", disable=not (show and dist.main),
               dynamic_ncols=True, desc=cfg.model.name)
    log_ = _Log(_Window(s.device, dist), it0=s.it, lines=not show and dist.main)
    s.model.train()
    try:
        while s.it < total:
            epoch, begin = divmod(s.it, s.steps)
            for x, y in s.data.train.batches(epoch, begin):
                x, y = x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)
                lr = _step(s, x, y, crit, autocast, log_.window)
                bar.update(1)
                _after_step(s, metrics, log_, lr, bar)
                if s.it == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if s.it >= total:
                    break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where train/signals.py makes it one
        # Not again at a step just saved: rewriting it would first remove the only copy.
        if not dist.enabled and math.isfinite(log_.window.read()[0]) \
                and run.latest_checkpoint() != run.checkpoint(s.it):
            s.save()
        raise
    finally:
        bar.close()
        metrics.close()
    return finish(s.scored, s.data, run, metrics, cfg, s.it, s.seconds(),
                  log_.final_test if s.it == total else None, dist, s.choice)


def _step(s: TrainState, x: torch.Tensor, y: torch.Tensor, crit: nn.Module,
          autocast: contextlib.AbstractContextManager[Any], window: _Window) -> float:
    """One training step at iteration s.it, which it advances; returns the step's lr."""
    lr = s.sched(s.it)
    for g in s.opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)  # finetune.backbone_lr (make_optimizer)
    loss, wrong = train_step(s.model, s.opt, crit, x, y, s.cfg, autocast, s.dist)
    if s.lookahead is not None:
        s.lookahead.after_step(s.it + 1, s.cfg.schedule.iterations)
    if loss is None:
        log.warning("iteration %d: non-finite loss, step skipped", s.it)
    else:
        window.add(loss, wrong, len(y))
        if s.ema is not None:
            s.ema.update_parameters(s.core)
    if not s.sched.warmup.done:  # paper sec. 4.2: needs the error now, so sync
        s.recent.append(s.dist.sum(wrong.double()).item() / (len(y) * s.dist.world))
        s.sched.observe_train_error(s.it, sum(s.recent) / len(s.recent))
        if s.sched.warmup.done:
            log.info("warm-up ended at iteration %d (train error %.1f%%)", s.it,
                     100 * sum(s.recent) / len(s.recent))
    s.it += 1
    return lr


@dataclass
class _Log:
    """What the loop reports from: the open window, the last train record, the clock."""

    window: _Window
    it0: int = 0  # the iteration this process started at
    lines: bool = False  # no progress bar (not a terminal): a progress line now and then
    last: dict[str, Any] = field(default_factory=dict)
    final_test: EvalResult | None = None
    t_start: float = field(default_factory=time.perf_counter)
    said: float = field(default_factory=time.perf_counter)  # when the last line went out
    last_step: float | None = None  # when the previous step ended (None: none timed yet)
    timed: list[float] = field(default_factory=list)  # seconds of steps with no evaluation
    estimated: bool = False
    marks: deque[tuple[float, int]] = field(default_factory=deque)  # (time, iteration) per line

    def expected_time(self, it: int, total: int, batch: int, restart: bool) -> None:
        """Once, ESTIMATE_STEPS steps in: how long the rest will take at this speed. The
        first step (warm-up) and each step that ended in an evaluation are not timed, so
        runs that evaluate every few steps (small folders, one epoch each) get it too."""
        if self.estimated:
            return
        now = time.perf_counter()
        if self.last_step is not None and not restart:
            self.timed.append(now - self.last_step)
        self.last_step = now
        if len(self.timed) == ESTIMATE_STEPS and it < total:
            per_step = sum(self.timed) / ESTIMATE_STEPS
            log.info("expected: about %s for the %d iterations left (%.0f images/s), plus "
                     "evaluations", format_duration(per_step * (total - it)), total - it,
                     batch / per_step)
            self.estimated = True

    def time_left(self, now: float, it: int, total: int) -> float:
        """Seconds to go at the speed of the last RATE_WINDOW_S, evaluations included: a run
        that shares its cores (or is paused) for a while shows it within minutes, instead of
        diluted over the hours since it started."""
        if not self.marks:
            self.marks.append((self.t_start, self.it0))
        self.marks.append((now, it))
        while len(self.marks) > 2 and now - self.marks[1][0] >= RATE_WINDOW_S:
            self.marks.popleft()
        t0, it0 = self.marks[0]
        return (total - it) * (now - t0) / max(it - it0, 1)

    def progress_line(self, it: int, total: int) -> None:
        """Where a run piped to a file or a batch system's log stands, every PROGRESS_S."""
        now = time.perf_counter()
        if not self.lines or now - self.said < PROGRESS_S:
            return
        self.said = now
        left = self.time_left(now, it, total)
        log.info("iteration %d/%d (%.0f%%): loss %.3f, train error %.1f%%, %.0f images/s, "
                 "about %s left", it, total, 100 * it / total, self.last["loss"],
                 100 * self.last["train_error"], self.last["images_per_s"], format_duration(left))



def _after_step(s: TrainState, metrics: MetricsLog, log_: _Log, lr: float, bar: Any) -> None:
    """The metric line, evaluation and checkpoint due after the step that reached s.it."""
    cfg, it, total = s.cfg, s.it, s.cfg.schedule.iterations
    is_eval = it % (cfg.eval_every or s.steps) == 0 or it == total
    if it % cfg.log_every == 0 or is_eval:
        log_.last = _log_train(metrics if s.dist.main else None, log_.window, it, s.steps,
                               lr, s.run)
        bar.set_postfix(loss=f"{log_.last['loss']:.3f}",
                        err=f"{100 * log_.last['train_error']:.1f}%",
                        lr=f"{lr:.3g}", ips=f"{log_.last['images_per_s']:.0f}")
        log_.window = _Window(s.device, s.dist)
        log_.progress_line(it, total)
    if is_eval:
        ev, log_.final_test = _eval_splits(s.scored, s.data, len(s.data.classes),
                                           cfg.test_curve or it == total, s.dist,
                                           0 if it == total else cfg.test_curve_images,
                                           cfg.tta)
        if s.dist.main:
            last = log_.last
            metrics.write({"kind": "eval", "iteration": it, "epoch": it / s.steps,
                           "train_loss": last["loss"], "train_error": last["train_error"],
                           "lr": lr, "images_per_s": last["images_per_s"],
                           "elapsed_s": time.perf_counter() - log_.t_start, **ev})
            errors = ", ".join(f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in ev.items()
                               if k.endswith("_error") and v is not None)
            subset = f" (of the first {ev['test_images']:,} test images)" \
                if "test_images" in ev else ""
            log.info("iteration %d/%d: %s%s", it, total, errors, subset)
        s.save()
        log_.window = _Window(s.device, s.dist)  # the evaluation is not training speed
    elif cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
        s.save()
    if s.dist.main:
        log_.expected_time(it, total, cfg.batch_size, restart=is_eval)


def _log_train(metrics: MetricsLog | None, window: _Window, it: int, steps: int, lr: float,
               run: RunDir) -> dict[str, Any]:
    loss, err, speed = window.read()
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"the loss became {loss} before iteration {it}; the last good "
                                 f"checkpoint is kept in {run.checkpoints} (lower optim.lr, or set "
                                 "nonfinite=skip)")
    rec = {"kind": "train", "iteration": it, "epoch": it / steps, "loss": loss,
           "train_error": err, "lr": lr, "images_per_s": speed}
    if metrics is not None:
        metrics.write(rec)
    return rec


def finish(model: nn.Module, data: DataBundle, run: RunDir, metrics: MetricsLog,
           cfg: TrainConfig, iterations: int, seconds: float,
           test: EvalResult | None = None, dist: DistInfo = SINGLE_PROCESS,
           choice: Choice | None = None) -> RunResult:
    """Final weights, the test evaluation (unless the last step already made it), figures."""
    if test is None:
        same_buffers(model, dist)
        test = evaluate(model, data.test.batches(0), len(data.classes), cfg.tta,
                        reduce=dist.sum)
    result = RunResult(run.path, run.final, run.curves, test, iterations, seconds)
    if not dist.main:
        return result
    save_weights(model, run.final, class_names=data.classes, **data.weights_config())
    choice = choice or Choice(cfg.precision, "asked for")
    test.save(run.eval_report, data.classes, split="test", tta=cfg.tta,
              precision=choice.precision, precision_reason=choice.reason,
              iterations=iterations, train_seconds=round(seconds, 3),
              device=device_name(next(model.parameters()).device))
    plot_confusion(test.confusion, data.classes, run.confusion,
                   f"{cfg.model.name}: test error {100 * test.top1_error:.2f}%")
    plot_curves(metrics.records(), run.curves, f"{cfg.model.name} on {cfg.data.dataset}")
    return result


def finished_result(run: RunDir, cfg: TrainConfig) -> RunResult:
    """A finished run as its files report it: final/ and eval.json, nothing recomputed."""
    report = json.loads(run.eval_report.read_text())
    test = EvalResult(report["top1_error"], report["top5_error"], report["loss"],
                      report["count"], list(report["per_class_accuracy"].values()),
                      report["confusion"])
    log.info("%s has finished; reporting it from %s", run.path, run.eval_report)
    return RunResult(run.path, run.final, run.curves, test,
                     report.get("iterations", cfg.schedule.iterations),
                     report.get("train_seconds"), already_finished=True)


__all__ = ["NonFiniteLossError", "RunResult", "make_optimizer", "train", "train_step"]
