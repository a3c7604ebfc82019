"""What a run holds before its first step, and what a checkpoint saves of it.

`checked_config` checks the request against the run directory and decides the precision,
once; `start` builds the data, the model (and the wrappers that step it: fused kernels,
DDP, compile), the optimizer and the schedule, restores them from the latest checkpoint
when resuming, and only then writes the run's config. Its order matters: the seed is set
before the data and the model draw random numbers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import TrainConfig, changes, saved_config, to_yaml
from ..data import DataBundle, build_data
from ..errors import ConfigError
from ..files import write_text_atomic
from ..kernels.fuse import fuse_bn_act
from ..models import ResNet
from ..models.factory import create_model
from ..precision import Choice, train_precision
from ..recipes import total_stride
from ..report import MetricsLog
from ..runs import RunDir, changed_images
from .allocator import keep_freed_memory
from .checkpoint import load_checkpoint, save_checkpoint
from .distributed import DistInfo, convert_sync_bn
from .finetune import freeze, init_from
from .lookahead import Lookahead
from .schedule import LRSchedule

log = logging.getLogger(__name__)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD over the trainable parameters, in groups by weight decay (off for BN and biases
    unless decay_bn_and_bias; Bag of Tricks sec. 3.1) and by lr: a group's `lr_scale` is
    finetune.backbone_lr for all but the classifier (head.*), which the loop applies."""
    o = cfg.optim
    found: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            scale = 1.0 if name.startswith("head.") else cfg.finetune.backbone_lr
            found.setdefault((o.decay_bn_and_bias or p.ndim > 1, scale), []).append(p)
    groups: list[dict[str, Any]] = [
        {"params": ps, "lr_scale": scale, **({} if decay else {"weight_decay": 0.0})}
        for (decay, scale), ps in found.items()]
    # lr: the value of a constant-lr step (reproduce/gradients.py, the benchmarks); `train`
    # sets every step's lr from the schedule instead.
    # fused: one kernel updates every tensor, instead of a Python loop of small ops per
    # tensor (same arithmetic; docs/performance.md has its time); CPU and CUDA have it.
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, fused=fused or None)


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


def _precision(cfg: TrainConfig, device: torch.device, run: RunDir,
               saved: dict[str, Any] | None) -> Choice:
    """`auto` resolved for this device; a resumed run (`saved`: its config) keeps the
    precision it was started with: the one its choices.json records, or, for runs saved
    before that file, the one its config.yaml names (runs saved before `precision`
    existed trained in fp32 on the CPU, bf16 on CUDA)."""
    if cfg.precision != "auto" or saved is None:
        return train_precision(cfg.precision, device)
    kept = saved["precision"]
    if kept == "auto":
        recorded = read_choice(run)
        kept = recorded.precision if recorded else "bf16" if device.type == "cuda" else "fp32"
    return Choice(kept, "auto: kept from the run being resumed")


def read_choice(run: RunDir) -> Choice | None:
    """What the run's `auto` precision became, from its choices.json (None if absent)."""
    try:
        found = json.loads(run.choices.read_text())
        return Choice(str(found["precision"]), str(found["reason"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prepare_model(cfg: TrainConfig, n_classes: int, in_chans: int, device: torch.device,
                   dist: DistInfo, fuse: bool, fresh: bool) -> tuple[nn.Module, ResNet]:
    """(the model to step, the plain model whose parameters it steps, for saving and
    evaluating). `fuse`: step a rewrite of it on the fused BN-ReLU kernels (kernels/fuse.py).
    `fresh`: no checkpoint will be restored, so finetune.init's weights are loaded."""
    core = create_model(cfg.model.name, num_classes=n_classes, in_chans=in_chans,
                        **cfg.model.options)
    if fresh and cfg.finetune.init:
        init_from(core, cfg.finetune.init, cfg.model.name)
    freeze(core, cfg.finetune.freeze)  # before the fused rewrite, which skips frozen BNs
    core = core.to(device)
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


@dataclass
class TrainState:
    """A run in progress: its config, data, model and what steps it, at iteration `it`."""

    cfg: TrainConfig
    run: RunDir
    dist: DistInfo
    device: torch.device
    choice: Choice  # what the run trains in, and why (cfg.precision is what was asked)
    data: DataBundle
    model: nn.Module  # what the step calls: `core`, or a wrapper sharing its parameters
    core: ResNet
    ema: AveragedModel | None
    lookahead: Lookahead | None
    opt: torch.optim.SGD
    sched: LRSchedule
    it: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=10))  # warm-up errors
    seconds_before: float = 0.0  # training time of the processes this one resumed
    clock: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        """Training time so far, over every process that trained this run."""
        return self.seconds_before + time.perf_counter() - self.clock

    @property
    def scored(self) -> nn.Module:
        """What evaluations and final/ hold: the moving average if kept, else the model."""
        return self.ema.module if self.ema is not None else self.core

    @property
    def steps(self) -> int:
        """Batches per epoch."""
        return len(self.data.train)

    def save(self) -> None:
        """A checkpoint of this moment (rank 0 writes; every rank waits for it)."""
        if self.dist.main:
            epoch, batch = divmod(self.it, self.steps)
            state = {"iteration": self.it, "epoch": epoch, "batch_in_epoch": batch,
                     "optimizer": self.opt.state_dict(), "schedule": self.sched.state_dict(),
                     "recent_errors": list(self.recent), "rng": torch.get_rng_state(),
                     "train_seconds": self.seconds(),
                     **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
                     **({"lookahead": self.lookahead.state_dict()}
                        if self.lookahead is not None else {})}
            save_checkpoint(self.run, self.core, state, self.data.classes,
                            self.data.weights_config())
        self.dist.barrier()

    def restore(self) -> None:
        """Continue from the run's latest checkpoint, if it has one."""
        found = self.run.latest_checkpoint()
        if found is None:
            return
        state = load_checkpoint(found, self.core)
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        self.recent.extend(state["recent_errors"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(state["lookahead"])
        torch.set_rng_state(state["rng"])
        self.it = int(state["iteration"])
        self.seconds_before = float(state.get("train_seconds", 0.0))  # older checkpoints: none
        self.clock = time.perf_counter()
        log.info("resuming %s from iteration %d", self.run.path, self.it)


_Tensors = tuple[torch.Tensor, ...] | list[torch.Tensor]


def ema_warmed_up(decay: float) -> Callable[[_Tensors, _Tensors, torch.Tensor | int], None]:
    """AveragedModel's update for an exponential moving average whose decay warms up:
    min(decay, (1 + n) / (10 + n)) after n updates, as TensorFlow's ExponentialMovingAverage
    with num_updates and the fast-training recipes do. A fixed decay would keep decay^steps
    of the first step's weights: 11% after 2,200 steps at 0.999."""

    def update(averaged: _Tensors, current: _Tensors, n_averaged: torch.Tensor | int) -> None:
        n = int(n_averaged)
        get_ema_multi_avg_fn(min(decay, (1 + n) / (10 + n)))(averaged, current, n_averaged)

    return update


def checked_config(cfg: TrainConfig, run: RunDir, resume: bool, dist: DistInfo
                   ) -> tuple[Choice, dict[str, Any] | None]:
    """The precision `cfg` trains in on this device, once `cfg` is checked against what
    `run` already holds, and that run's saved config (None for a new run): its config.yaml
    is read here, once."""
    saved = check_run_dir(cfg, run, resume)
    return _precision(cfg, dist.device(cfg.device), run, saved), saved


def check_run_dir(cfg: TrainConfig, run: RunDir, resume: bool) -> dict[str, Any] | None:
    """Whether `cfg` may train into `run` (a new run, or with `resume` the same config):
    else a one-line ConfigError. Returns the run's saved config (None for a new run)."""
    if run.config.exists() and not run.started() and not _ours(run):
        raise ConfigError(f"{run.config} is not a run's config.yaml (a file of yours?), and "
                          "training would replace it; choose another --out, or move it away")
    if run.data.exists() and not run.config.exists():  # written with config.yaml, after it
        raise ConfigError(f"{run.data} is not a run's (a file of yours?), and training on an "
                          "image folder would replace it; choose another --out, or move it away")
    saved = saved_config(run.config) if resume and run.config.exists() else None
    if not run.started():
        return saved
    if not resume:
        raise ConfigError(f"{run.path} already holds a run; pass --resume auto to continue it "
                          "or choose another --out")
    diff = changes(saved or {}, cfg)
    if diff:
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        raise ConfigError(f"{run.path} was started with another config ({', '.join(diff[:3])}"
                          f"{more}); to resume it, give no --preset, --config or --set (its "
                          "config.yaml is used), or choose another --out")
    # The loop records an evaluation, then saves: a second evaluation means a checkpoint was
    # complete once (a first one alone may be a kill during the first save, redone anyway).
    evaluated = MetricsLog(run).evaluations()
    if len(evaluated) > 1 and not run.checkpoint_dirs() and not run.finished():
        raise ConfigError(f"{run.metrics} records evaluations to iteration {evaluated[-1]:,} "
                          "but no checkpoint is left to resume from, and starting over would "
                          "drop those records; move metrics.jsonl and summary.csv away to "
                          "start over, or choose another --out")
    return saved


def _with_epochs(cfg: TrainConfig, steps: int, run: RunDir,
                 saved: dict[str, Any] | None) -> TrainConfig:
    """schedule.epochs turned into iterations, now that the batches per epoch are known. A
    resumed run keeps its length: a folder that has changed since is refused, since the
    schedule would stretch mid-run."""
    epochs = cfg.schedule.epochs
    if not epochs:
        return cfg
    planned = saved["schedule"]["iterations"] if saved and run.started() else epochs * steps
    if planned != epochs * steps:
        raise ConfigError(f"{run.path} was started with {planned // epochs} batches an epoch "
                          f"and the data now gives {steps}: the images changed; restore them, "
                          "or train into another --out")
    return dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule,
                                                                 iterations=planned))


CONFIG_HEAD = "# precision: "  # config.yaml's first line, as training writes it


def _ours(run: RunDir) -> bool:
    """Whether run.config was written by training (a run that stopped before its first
    step), not by hand: `--config exp/config.yaml --out exp` must not replace it."""
    with run.config.open("rb") as f:
        return f.readline().startswith(CONFIG_HEAD.encode())


def _write_config(run: RunDir, cfg: TrainConfig, choice: Choice) -> None:
    """config.yaml holds what was asked (precision auto stays auto, so --config RUN/config.yaml
    on another CPU chooses again); choices.json what it became here. Each whole or not at
    all: a resume rewrites them, and a kill then must not leave half a config."""
    choices = json.dumps({"precision": choice.precision, "reason": choice.reason}, indent=1)
    config = f"{CONFIG_HEAD}{choice.precision} ({choice.reason})\n" + to_yaml(cfg)
    write_text_atomic(run.choices, choices + "\n")
    write_text_atomic(run.config, config)


def start(cfg: TrainConfig, choice: Choice, run: RunDir, resume: bool,
          dist: DistInfo, saved: dict[str, Any] | None = None) -> TrainState:
    """Everything the first (or, resuming, the next) step needs. The data and the weights
    are read and checked before anything is written: a run that cannot start leaves no
    config.yaml. `choice` and `saved` are what `checked_config` returned."""
    device = dist.device(cfg.device)
    log.info("precision: %s (%s)", choice.precision, choice.reason)
    if resume and run.checkpoint_dirs() and run.latest_checkpoint() is None:
        raise ConfigError(f"{run.checkpoints} holds checkpoints but none is complete; nothing "
                          "was changed: move them away to start over, or choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if device.type == "cpu":
        keep_freed_memory()  # measured 3-15% faster steps (allocator.py)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg.data, cfg.batch_size, cfg.eval_batch_size, cfg.seed,
                      cfg.channels_last, rank=dist.rank, world=dist.world,
                      min_size=total_stride(cfg.model.name, cfg.model.options))
    if len(data.train) == 0:
        raise ConfigError(f"batch_size {cfg.batch_size} is larger than the training set; "
                          "set a smaller one with --set batch_size=N")
    cfg = _with_epochs(cfg, len(data.train), run, saved)
    fresh = not (resume and run.latest_checkpoint() is not None)
    why = None if fresh else changed_images(run, data.train_images)
    if why:
        raise ConfigError(f"the training images changed since {run.path} started ({why}): "
                          "resuming would train on others and draw its held-out images anew; "
                          "restore the folder, or start a new run with another --out")
    compiled = on_device(cfg.compile, device)
    fuse = cfg.fused_bn and device.type == "cpu" and not compiled  # fp32 and bf16 alike
    model, core = _prepare_model(cfg, len(data.classes), data.in_chans, device, dist, fuse,
                                 fresh)
    model = maybe_compile(model, compiled)
    ema = AveragedModel(core, multi_avg_fn=ema_warmed_up(cfg.ema_decay),
                        use_buffers=True) if cfg.ema_decay else None
    lookahead = Lookahead(core, dist) if cfg.optim.lookahead else None
    opt = make_optimizer(core, cfg)  # the parameters every wrapper of it steps
    state = TrainState(cfg, run, dist, device, choice, data, model, core, ema, lookahead, opt,
                       LRSchedule(cfg.schedule, cfg.optim.lr))
    if resume:
        state.restore()
    dist.barrier()  # every rank has read the run before rank 0 writes anything
    if dist.main:
        _write_config(run, cfg, choice)
        if fresh and data.train_images is not None:
            write_text_atomic(run.data, json.dumps(data.train_images.record(), indent=1) + "\n")
    return state
