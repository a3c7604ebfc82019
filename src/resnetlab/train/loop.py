"""The training loop: plain functions over explicit objects.

The position in the data is a function of the iteration alone (every epoch has the same
number of batches and its order comes from (seed, epoch)), so a checkpoint needs only the
iteration, the weights, the optimizer, the schedule's state and the RNG to resume exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ..data import DataBundle, build_data
from ..errors import ConfigError, ResNetLabError
from ..evaluation.evaluate import EvalResult, evaluate
from ..kernels.fuse import fuse_bn_act
from ..models import ResNet
from ..models.factory import create_model, save_weights
from ..precision import Choice, train_precision
from .allocator import keep_freed_memory
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, saved_config, to_yaml
from .distributed import SINGLE_PROCESS, DistInfo, convert_sync_bn, init_from_env, shutdown
from .report import MetricsLog, plot_confusion, plot_curves
from .rundir import RunDir
from .schedule import LRSchedule

log = logging.getLogger(__name__)
# A deterministic crash for the fault tests (tests/test_kill.py): the process SIGKILLs
# itself at the step boundary after this iteration, once that iteration's checkpoint (if
# any) is on disk, so a test chooses exactly where a run dies instead of racing a timer.
KILL_AT_ENV = "RESNETLAB_KILL_AT_ITERATION"


class NonFiniteLossError(ResNetLabError):
    """The loss became NaN or infinite."""


@dataclass
class RunResult:
    run_dir: Path
    weights: Path
    curves: Path
    test: EvalResult
    iterations: int
    seconds: float


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    o = cfg.optim
    if o.decay_bn_and_bias:
        groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    else:  # weight decay only on conv and fc weights (Bag of Tricks sec. 3.1)
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    # lr: the value of a constant-lr step (reproduce/gradients.py, the benchmarks); `train`
    # sets every step's lr from the schedule instead.
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay)


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


def _check_run_dir(run: RunDir, cfg: TrainConfig, resume: bool) -> None:
    if not run.started():
        return
    if not resume:
        raise ConfigError(f"{run.path} already holds a run; pass --resume auto to continue it "
                          "or choose another --out")
    old, new = saved_config(run.config) or {}, asdict(cfg)
    if old.get("precision") == "auto":  # saved before `precision`: _precision resolved it
        old["precision"] = new["precision"]
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ConfigError(f"{run.path} was started with another config (differs in "
                          f"{', '.join(diff)}); resume it with --config {run.config}")


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


def _eval_splits(model: nn.Module, data: DataBundle, n_classes: int, with_test: bool,
                 dist: DistInfo) -> tuple[dict[str, Any], EvalResult | None]:
    rec: dict[str, Any] = {"val_error": None, "test_error": None}
    test = None
    if data.val is not None:
        rec["val_error"] = evaluate(model, data.val.batches(0), n_classes,
                                    reduce=dist.sum).top1_error
    if with_test:
        test = evaluate(model, data.test.batches(0), n_classes, reduce=dist.sum)
        rec["test_error"] = test.top1_error
    return rec, test


def _prepare_model(cfg: TrainConfig, n_classes: int, in_chans: int, device: torch.device,
                   dist: DistInfo, fuse: bool) -> tuple[nn.Module, ResNet]:
    """(the model to step, the plain model whose parameters it steps, for saving and
    evaluating). `fuse`: step a rewrite of it on the fused BN-ReLU kernels (kernels/fuse.py)."""
    core = create_model(cfg.model.name, num_classes=n_classes, in_chans=in_chans,
                        **cfg.model.options).to(device)
    if cfg.channels_last:
        core = core.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.sync_bn:
        convert_sync_bn(core, device)
    stepped: nn.Module = core
    if fuse:
        stepped = fuse_bn_act(core) or core
        log.info("fused BN-ReLU kernels: %s", "on" if stepped is not core else "off")
    if not dist.enabled:
        return stepped, core
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(stepped, device_ids=ids), core


def _precision(cfg: TrainConfig, device: torch.device, run: RunDir, resume: bool) -> Choice:
    """`auto` resolved for this device; a resumed run keeps the precision it was started
    with (runs saved before `precision` existed trained in fp32 on the CPU, bf16 on CUDA)."""
    saved = saved_config(run.config) if resume else None
    if cfg.precision == "auto" and saved is not None:
        kept = saved["precision"]
        if kept == "auto":
            kept = "bf16" if device.type == "cuda" else "fp32"
        return Choice(kept, "auto: kept from the run being resumed")
    return train_precision(cfg.precision, device)


def on_device(setting: bool | None, device: torch.device) -> bool:
    """An on/off setting whose default (None) is: on for CUDA devices, off on the CPU."""
    return device.type == "cuda" if setting is None else setting


def maybe_compile(model: nn.Module, enabled: bool) -> nn.Module:
    """torch.compile, falling back to eager for whatever graph the compiler cannot handle."""
    if not enabled:
        return model
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a failed compile runs that frame eagerly
    return cast(nn.Module, torch.compile(model))  # an OptimizedModule


def train(cfg: TrainConfig, run_dir: str | os.PathLike[str], resume: bool = False,
          progress: bool | None = None) -> RunResult:
    """Train `cfg` into `run_dir`; with `resume`, continue from its latest checkpoint.

    Under torchrun each rank calls this; rank 0 alone writes files.
    """
    dist = init_from_env(cfg.dist_timeout_s)
    try:
        return _train(cfg, RunDir(run_dir), resume, progress, dist)
    finally:
        shutdown(dist)


def _train(cfg: TrainConfig, run: RunDir, resume: bool, progress: bool | None,
           dist: DistInfo) -> RunResult:
    device = dist.device(cfg.device)
    choice = _precision(cfg, device, run, resume)
    cfg = dataclasses.replace(cfg, precision=choice.precision)  # config.yaml holds the choice
    log.info("precision: %s (%s)", choice.precision, choice.reason)
    _check_run_dir(run, cfg, resume)
    dist.barrier()  # every rank has looked before rank 0 writes anything
    if dist.main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.config.write_text(f"# precision: {choice.precision} ({choice.reason})\n"
                              + to_yaml(cfg))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()  # measured 3-15% faster steps (allocator.py)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.batch_size, cfg.eval_batch_size, cfg.seed,
                      cfg.channels_last, rank=dist.rank, world=dist.world)
    n_classes = len(data.classes)
    compiled = on_device(cfg.compile, device)
    fuse = cfg.fused_bn and device.type == "cpu" and not compiled and cfg.precision == "fp32"
    model, core = _prepare_model(cfg, n_classes, data.in_chans, device, dist, fuse)
    model = maybe_compile(model, compiled)
    data_cfg = {"input_size": data.input_size, "mean": data.mean, "std": data.std}
    ema = AveragedModel(core, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay),
                        use_buffers=True) if cfg.ema_decay else None
    scored = ema.module if ema is not None else core  # what evaluations and final/ hold
    opt = make_optimizer(core, cfg)  # the parameters every wrapper of it steps
    sched = LRSchedule(cfg.schedule, cfg.optim.lr)
    recent: deque[float] = deque(maxlen=10)  # batch errors seen by the conditional warm-up
    steps = len(data.train)
    if steps == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set")
    total, it = cfg.schedule.iterations, 0
    metrics = MetricsLog(run)

    found = run.latest_checkpoint() if resume else None
    if found is not None:
        state = load_checkpoint(found, core)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        recent.extend(state["recent_errors"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        it = int(state["iteration"])
        log.info("resuming %s from iteration %d", run.path, it)
    if dist.main:
        metrics.truncate_after(it)

    def checkpoint() -> None:
        if dist.main:
            epoch, batch = divmod(it, steps)
            state = {"iteration": it, "epoch": epoch, "batch_in_epoch": batch,
                     "optimizer": opt.state_dict(), "schedule": sched.state_dict(),
                     "recent_errors": list(recent), "rng": torch.get_rng_state(),
                     **({"ema": ema.state_dict()} if ema is not None else {})}
            save_checkpoint(run, core, state, data.classes, data_cfg)
        dist.barrier()

    eval_every = cfg.eval_every or steps
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
    # bf16 autocast: activations and weights in bf16 for the convolutions, BN statistics and
    # the loss in fp32. The fused BN-ReLU kernels are fp32 only: unfused bf16 measured faster
    # than fused fp32 on an AVX512-BF16 CPU (docs/performance.md).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
        if cfg.precision == "bf16" else contextlib.nullcontext()
    show = sys.stderr.isatty() if progress is None else progress
    kill_at = int(os.environ.get(KILL_AT_ENV) or -1)
    bar = tqdm(total=total, initial=it, unit="it", disable=not (show and dist.main),
               dynamic_ncols=True, desc=cfg.model.name)
    window, t_start = _Window(device, dist), time.perf_counter()
    last: dict[str, Any] = {}
    final_test: EvalResult | None = None
    model.train()
    try:
        while it < total:
            epoch, start = divmod(it, steps)
            for x, y in data.train.batches(epoch, start):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                lr = sched(it)
                for g in opt.param_groups:
                    g["lr"] = lr
                loss, wrong = train_step(model, opt, crit, x, y, cfg, autocast, dist)
                if loss is None:
                    log.warning("iteration %d: non-finite loss, step skipped", it)
                else:
                    window.add(loss, wrong, len(y))
                    if ema is not None:
                        ema.update_parameters(core)
                if not sched.warmup.done:  # paper sec. 4.2: needs the error now, so sync
                    recent.append(dist.sum(wrong.double()).item() / (len(y) * dist.world))
                    sched.observe_train_error(it, sum(recent) / len(recent))
                    if sched.warmup.done:
                        log.info("warm-up ended at iteration %d (train error %.1f%%)", it,
                                 100 * sum(recent) / len(recent))
                it += 1
                bar.update(1)
                is_eval = it % eval_every == 0 or it == total
                if it % cfg.log_every == 0 or is_eval:
                    last = _log_train(metrics if dist.main else None, window, it, steps, lr,
                                      run)
                    bar.set_postfix(loss=f"{last['loss']:.3f}",
                                    err=f"{100 * last['train_error']:.1f}%",
                                    lr=f"{lr:.3g}", ips=f"{last['images_per_s']:.0f}")
                    window = _Window(device, dist)
                if is_eval:
                    ev, final_test = _eval_splits(scored, data, n_classes,
                                                  cfg.test_curve or it == total, dist)
                    if dist.main:
                        metrics.write({"kind": "eval", "iteration": it, "epoch": it / steps,
                                       "train_loss": last["loss"],
                                       "train_error": last["train_error"], "lr": lr,
                                       "images_per_s": last["images_per_s"],
                                       "elapsed_s": time.perf_counter() - t_start, **ev})
                        log.info("iteration %d/%d: %s", it, total, ", ".join(
                            f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in ev.items()
                            if v is not None))
                    checkpoint()
                    window = _Window(device, dist)  # the evaluation is not training speed
                elif cfg.checkpoint_every and it % cfg.checkpoint_every == 0:
                    checkpoint()
                if it == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if it >= total:
                    break
    except KeyboardInterrupt:
        if not dist.enabled and math.isfinite(window.read()[0]):
            checkpoint()
        raise
    finally:
        bar.close()
    return finish(scored, data, run, metrics, cfg, it, time.perf_counter() - t_start,
                  final_test if it == total else None, dist, choice.reason)


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
           precision_reason: str = "") -> RunResult:
    """Final weights, the test evaluation (unless the last step already made it), figures."""
    if test is None:
        test = evaluate(model, data.test.batches(0), len(data.classes), reduce=dist.sum)
    result = RunResult(run.path, run.final, run.curves, test, iterations, seconds)
    if not dist.main:
        return result
    save_weights(model, run.final, class_names=data.classes, input_size=data.input_size,
                 mean=data.mean, std=data.std)
    test.save(run.eval_report, data.classes, split="test", tta="center",
              precision=cfg.precision, precision_reason=precision_reason)
    plot_confusion(test.confusion, data.classes, run.confusion,
                   f"{cfg.model.name}: test error {100 * test.top1_error:.2f}%")
    plot_curves(metrics.records(), run.curves, f"{cfg.model.name} on {cfg.data.dataset}")
    return result


__all__ = ["NonFiniteLossError", "RunResult", "make_optimizer", "train", "train_step"]
