"""Typed training configuration and the one override path.

A run's configuration is: the dataclass defaults, then a preset (recipes.py), then settings
mappings (a recipe's, such as the one sized from an image folder), then a YAML file
(`--config`), then `--set key=value` pairs, command-line flags among them (each flag is
the pair it names); each layer goes through the same checks in `resolve`, the only entry.
The result is saved as the run's `config.yaml`, as asked (`precision: auto` stays auto;
what it became is the run's choices.json), and `--config` reads it back. Every wrong key,
type or value is a one-line ConfigError naming the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .data import DATASETS, DataConfig
from .errors import ConfigError
from .models.registry import ARCH_KEYS, build_model, get_spec
from .precision import TRAIN_PRECISIONS
from .recipes import PRESETS

SCHEDULES = ("multistep", "cosine", "onecycle", "constant")
TRAIN_TTA = ("center", "flip")  # the views cheap enough for every evaluation of a run
# A billion steps is years on any machine; more is a typo (1e26), not a plan.
MAX_ITERATIONS = 10**9


@dataclass
class ModelSection:
    name: str = "resnet20"  # a registered model (reference/models.md) or cifar_resnetN
    options: dict[str, Any] = field(default_factory=dict)  # ResNet overrides: shortcut, ...


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate of SGD
    momentum: float = 0.9  # SGD momentum (paper sec. 3.4: 0.9)
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 1e-4  # L2 penalty (paper sec. 3.4: 1e-4)
    decay_bn_and_bias: bool = True  # False: no weight decay on BN parameters and biases
    label_smoothing: float = 0.0  # weight of the uniform target in the loss (0: none)
    grad_clip: float = 0.0  # max global gradient norm; 0 disables
    # every 5 steps pull the weights into a slow copy and reset them to it, more strongly
    # as the run ends (train/lookahead.py; the fast CIFAR-10 recipes' lookahead)
    lookahead: bool = False


@dataclass
class ScheduleConfig:
    kind: str = "multistep"  # lr schedule: multistep, cosine, onecycle or constant
    iterations: int = 64000  # optimiser steps of the run (paper sec. 4.2: 64k)
    # > 0: the run lasts this many passes over the training set; `iterations` is then set
    # from the data's batches per epoch when training starts (and saved so in config.yaml)
    epochs: int = 0
    # multistep: iterations at which lr is multiplied by gamma (paper sec. 4.2: 32k, 48k)
    milestones: list[int] = field(default_factory=lambda: [32000, 48000])
    gamma: float = 0.1  # multistep: the factor at each milestone
    warmup_iters: int = 0  # linear ramp from warmup_lr to lr over these iterations
    warmup_lr: float = 0.0  # lr at the start of a warm-up
    # > 0: hold warmup_lr until the training error falls below this (paper sec. 4.2, 110 layers)
    warmup_until_error: float = 0.0
    final_lr: float = 0.0  # floor of cosine and one-cycle


@dataclass
class FinetuneConfig:
    """Starting from pretrained weights (train/finetune.py)."""

    init: str = ""  # weights to start from (train --init): a path; "" trains from scratch
    freeze: str = ""  # comma-separated parts kept fixed: stem, layer1.. (stage1..), backbone
    backbone_lr: float = 1.0  # lr of everything but the classifier, as a fraction of optim.lr


@dataclass
class LogConfig:
    tensorboard: bool = False  # also write TensorBoard scalars to RUN/tensorboard/


@dataclass
class TrainConfig:
    """Every setting of a training run; its sections are the nested dataclasses.

    Build one with `resolve`, the only way in, which checks every key, type and value.
    The keys, types, defaults and meanings are tabled in the docs' configuration
    reference, generated from this class.

    Examples:
        >>> from resnetlab.config import resolve
        >>> cfg = resolve("smoke", sets=["optim.lr=0.05", "schedule.milestones=[10,15]"])
        >>> cfg.optim.lr, cfg.schedule.milestones, cfg.model.name
        (0.05, [10, 15], 'resnet8')
    """

    preset: str = "custom"  # the preset the run started from (--preset), as recorded
    seed: int = 0  # seeds weights, data order and augmentation: same seed, same run on a CPU
    batch_size: int = 128  # the global batch (split over data-parallel processes)
    eval_batch_size: int = 1000  # images per forward pass in evaluations
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_every: int = 0  # iterations between evaluations; 0: once an epoch
    checkpoint_every: int = 0  # iterations between extra checkpoints (each evaluation saves one)
    # > 0: evaluate and ship an exponential moving average of the weights, its decay warmed
    # up as min(ema_decay, (1 + n) / (10 + n)) after n steps
    ema_decay: float = 0.0
    # the views every evaluation of training scores: "center", or "flip" (the image and its
    # mirror, averaged; free where training flips); `resnetlab eval --tta` has the others
    tta: str = "center"
    log_every: int = 50  # iterations between metric lines
    log: LogConfig = field(default_factory=LogConfig)
    test_curve: bool = True  # also score the test set at each evaluation, for the curve only
    # > 0: the curve's evaluations score only the first N test images (with P processes,
    # the first N of each one's shard: about P x N, recorded as test_images), so a curve can
    # have many points; the last evaluation always scores the whole split
    test_curve_images: int = 0
    channels_last: bool = True  # NHWC memory layout for convolutions (faster on CPUs and GPUs)
    # "auto": bf16 autocast where the device multiplies bf16 natively (CUDA; CPUs with AMX
    # or AVX512-BF16), fp32 elsewhere (resnetlab.precision). A run's config.yaml keeps the
    # request; its choices.json what auto chose, which a resume keeps (train/setup.py).
    precision: str = "auto"
    compile: bool | None = None  # torch.compile the model; None: on CUDA devices only
    fused_bn: bool = True  # CPU, not compiled: fused BN(+add)+ReLU kernels (resnetlab.kernels)
    threads: int = 0  # torch intra-op threads; 0: PyTorch's default
    nonfinite: str = "stop"  # on a NaN/inf loss: "stop", or "skip" the step
    device: str = "auto"  # "auto" (this rank's GPU if any, else CPU), "cpu", "cuda"
    sync_bn: bool = False  # data-parallel runs: BatchNorm statistics over the global batch
    dist_timeout_s: int = 300  # how long ranks wait for a dead peer before the job fails


EXECUTORS = ("local", "slurm", "debug")


@dataclass
class ClusterConfig:
    """Where and with what `--executor` runs jobs (resnetlab.cluster): the `cluster:` section
    of a `--cluster-config` YAML file, then the command's flags; `resolve_cluster` checks it."""

    # local: processes on this machine; slurm: sbatch (arrays for sub-runs); debug: in this
    # process, one after the other (tests, pdb)
    executor: str = "local"
    partition: str | None = None  # sbatch --partition
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    # minutes per SLURM job (local jobs have no limit); SLURM warns a job 90 s before,
    # and it is requeued to resume
    time_limit_min: int = 240
    nodes: int = 1  # machines of one `train` job (a reproduce sub-run is one process)
    gpus_per_node: int = 0  # GPUs per machine; a `train` job runs one process per GPU
    cpus_per_task: int = 2  # cores per process, and its PyTorch threads
    mem_gb: float | None = None  # memory per machine; None: the partition's default
    array_parallelism: int = 32  # sub-runs of one experiment running at once
    # requeues of a job that reached its time limit; a pre-emption (SLURM's signal before
    # both 80% of the limit and its last 10 minutes) is requeued any number of times
    max_requeues: int = 3
    setup: list[str] = field(default_factory=list)  # shell lines before the job (module load, ...)
    # other sbatch options, e.g. {constraint: a100, exclude: node7}
    sbatch: dict[str, Any] = field(default_factory=dict)

    @property
    def tasks_per_node(self) -> int:
        """Processes per machine of a `train` job: one per GPU, else one."""
        return max(self.gpus_per_node, 1)


# ----------------------------------------------------------------------- the override path

def _closest(key: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean {near[0]}?)" if near else ""


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(path, value, next(a for a in args if a is not type(None)))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp in (int, float) and isinstance(value, str):
        value = _number(value)  # YAML 1.1 reads 1e-3 and 1e3 as strings
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 1e3 iterations
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path} must be {tp.__name__}, got {value!r}")


def _number(text: str) -> int | float | str:
    """A number as Python's int() or float() reads it (1e-3, 2E4, 1_000), else the text."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


# `bf16: true|false|null` (before `precision`) still reads: runs saved with it resume.
_LEGACY_BF16 = {True: "bf16", False: "fp32", None: "auto"}


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """A copy of dataclass `obj` with `updates` (a nested mapping) checked and applied."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    if isinstance(obj, TrainConfig) and "bf16" in updates:
        updates = dict(updates)
        old = updates.pop("bf16")
        if old not in _LEGACY_BF16:
            raise ConfigError(f"bf16 must be true, false or null, got {old!r} "
                              "(it is now precision: auto, fp32 or bf16)")
        updates.setdefault("precision", _LEGACY_BF16[old])
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    changes = {}
    for key, value in updates.items():
        path = prefix + str(key)
        if key not in fields:
            raise ConfigError(f"unknown key {path!r}{_closest(str(key), list(fields))}; "
                              f"valid keys: {', '.join(prefix + k for k in fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = _merge(current, value, path + ".")
        else:
            changes[key] = _coerce(path, value, hints[key])
    return dataclasses.replace(obj, **changes)


def _one_line(e: Exception) -> str:
    """YAML errors span lines with a caret drawing; the CLI promises one line."""
    return " ".join(str(e).split())


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """`["optim.lr=0.05", "model.options={shortcut: B}"]` -> a nested mapping (YAML values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: {raw!r} is not a valid value "
                              f"({_one_line(e)})") from None
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is set twice")
        node[leaf] = value
    return out


def named(sets: Sequence[str]) -> dict[str, Any]:
    """The settings the --set pairs name (`key.sub` -> value), each checked for its type
    but not yet against the others (a recipe still chooses those): what a recipe that is
    sized around the user's own choices reads."""
    keys = set(leaves(parse_set(sets)))
    return {k: v for k, v in leaves(asdict(_merge(TrainConfig(), parse_set(sets)))).items()
            if k in keys}


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                          f"at offset {e.start})") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {_one_line(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys")
    return data


def _check_range(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def frozen_parts(spec: str, stages: list[str]) -> list[str]:
    """`stem,stage1` (or layer1) / `backbone` -> module names; a wrong name is one line."""
    parts: list[str] = []
    for word in (w.strip() for w in spec.split(",") if w.strip()):
        word = re.sub(r"^stage(\d+)$", r"layer\1", word)
        if word == "backbone":
            parts += ["stem", *stages, "final_act"]
        elif word in ("stem", *stages):
            parts.append(word)
        else:
            raise ConfigError(f"finetune.freeze: unknown part {word!r}; choose from stem, "
                              f"{', '.join(stages)} (or stage1..), backbone")
    return list(dict.fromkeys(parts))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks no type annotation can express: choices and ranges."""
    d, s, o = cfg.data, cfg.schedule, cfg.optim
    _check_range(d.dataset in DATASETS, f"data.dataset must be one of {', '.join(DATASETS)}")
    _check_range(d.normalize in ("channel", "pixel"), "data.normalize must be channel or pixel")
    _check_range(s.kind in SCHEDULES, f"schedule.kind must be one of {', '.join(SCHEDULES)}")
    _check_range(cfg.nonfinite in ("stop", "skip"), "nonfinite must be stop or skip")
    _check_range(cfg.tta in TRAIN_TTA, f"tta must be one of {', '.join(TRAIN_TTA)} (10crop "
                 "and multiscale: `resnetlab eval --tta` on the finished run)")
    _check_range(cfg.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")
    _check_range(cfg.precision in TRAIN_PRECISIONS,
                 f"precision must be one of {', '.join(TRAIN_PRECISIONS)}")
    _check_range(cfg.dist_timeout_s >= 1, "dist_timeout_s must be >= 1")
    _check_range(min(cfg.eval_every, cfg.checkpoint_every) >= 0 and cfg.log_every >= 1,
                 "eval_every and checkpoint_every must be >= 0, log_every >= 1")
    _check_range(cfg.batch_size >= 1 and cfg.eval_batch_size >= 1, "batch sizes must be >= 1")
    _check_range(cfg.test_curve_images >= 0, "test_curve_images must be >= 0")
    _check_range(1 <= s.iterations <= MAX_ITERATIONS,
                  f"schedule.iterations must be in [1, {MAX_ITERATIONS:.0e}], got {s.iterations}")
    _check_range(o.lr > 0, "optim.lr must be > 0")
    _check_range(0 <= o.momentum < 1, "optim.momentum must be in [0, 1)")
    _check_range(o.weight_decay >= 0, "optim.weight_decay must be >= 0")
    _check_range(0 <= o.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)")
    _check_range(0 <= cfg.ema_decay < 1, "ema_decay must be in [0, 1)")
    _check_range(0 <= s.warmup_until_error < 1, "schedule.warmup_until_error must be in [0, 1)")
    _check_range(d.pad >= 0 and d.val_split >= 0, "data.pad and data.val_split must be >= 0")
    _check_range(0 <= d.max_bad_fraction <= 1, "data.max_bad_fraction must be in [0, 1]")
    _check_range(d.image_size >= 1, "data.image_size must be >= 1")
    _check_range(s.milestones == sorted(s.milestones), "schedule.milestones must increase")
    _check_range(s.epochs >= 0, "schedule.epochs must be >= 0")
    _check_range(not (s.epochs and s.kind == "multistep" and s.milestones),
                 "schedule.milestones count iterations, which schedule.epochs leaves open: "
                 "with epochs use schedule.kind=cosine or onecycle, or set schedule.epochs=0")
    _check_range(cfg.finetune.backbone_lr > 0, "finetune.backbone_lr must be > 0 (freeze "
                 "the backbone with finetune.freeze=backbone)")
    spec = get_spec(cfg.model.name)
    bad = sorted(set(cfg.model.options) - set(ARCH_KEYS))
    _check_range(not bad, f"unknown model.options {bad}; valid: {', '.join(ARCH_KEYS)}")
    with torch.device("meta"):  # bad option values fail here, before any data is read
        model = build_model(spec, spec.num_classes, 3, cfg.model.options)
    frozen_parts(cfg.finetune.freeze, model.stage_names)
    return cfg


def resolve(preset: str | None, config_file: str | None = None,
            sets: Sequence[str] | None = None,
            settings: Sequence[Mapping[str, Any]] = ()) -> TrainConfig:
    """A run's configuration: the one override path, every layer checked the same way.

    Defaults, then the preset, then `settings` (nested mappings such as a recipe's), then
    the YAML file, then the --set pairs. The only way in: command-line flags arrive as
    --set pairs (cli/run.py), recipes sized from data as `settings`.

    Args:
        preset: a preset name (`resnetlab train --help` lists them), or None.
        config_file: a YAML file, such as a run's `config.yaml`, or None.
        sets: `key=value` pairs, values in YAML (`schedule.milestones=[100,200]`).
        settings: nested mappings applied after the preset.

    Returns:
        The resolved, checked configuration.

    Raises:
        ConfigError: an unknown preset or key, or a wrong type or value; one line naming
            the valid choices (and the closest key to a misspelt one).

    Examples:
        >>> from resnetlab.config import resolve
        >>> resolve("smoke", sets=["optim.lr=0.05"]).optim.lr
        0.05
        >>> resolve("smoke", sets=["optim.lrr=0.05"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        resnetlab.errors.ConfigError: unknown key 'optim.lrr' (did you mean lr?); valid keys: ...
    """
    cfg = TrainConfig()
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{_closest(preset, list(PRESETS))}; "
                              f"choose one of {', '.join(PRESETS)}")
        cfg = _merge(cfg, {**PRESETS[preset], "preset": preset})
    for layer in settings:
        cfg = _merge(cfg, dict(layer))
    if config_file:
        cfg = _merge(cfg, load_yaml(config_file))
    if sets:
        cfg = _merge(cfg, parse_set(sets))
    return validate(cfg)


def resolve_cluster(config_file: str | None = None,
                    flags: Mapping[str, Any] | None = None) -> ClusterConfig:
    """The cluster settings: defaults, then the `cluster:` section of `config_file`, then the
    command's flags (None: not given); every key, type and value checked."""
    cc = ClusterConfig()
    if config_file:
        data = load_yaml(config_file)
        if set(data) != {"cluster"}:
            raise ConfigError(f"{config_file} must hold one section, cluster: (its keys: "
                              f"{', '.join(f.name for f in dataclasses.fields(ClusterConfig))})")
        section = data["cluster"] or {}
        cc = _merge(cc, section, "cluster.")
        if "executor" not in section and (flags or {}).get("executor") is None:
            raise ConfigError(f"{config_file} names no executor: add executor: slurm (or "
                              "local) to its cluster: section, or give --executor")
    cc = _merge(cc, {k: v for k, v in (flags or {}).items() if v is not None}, "cluster.")
    _check_range(cc.executor in EXECUTORS,
                 f"cluster.executor must be one of {', '.join(EXECUTORS)}")
    _check_range(min(cc.time_limit_min, cc.nodes, cc.cpus_per_task, cc.array_parallelism) >= 1,
                 "cluster.time_limit_min, nodes, cpus_per_task and array_parallelism must be >= 1")
    _check_range(min(cc.gpus_per_node, cc.max_requeues) >= 0,
                 "cluster.gpus_per_node and max_requeues must be >= 0")
    _check_range(cc.nodes == 1 or cc.executor == "slurm",
                 f"cluster.nodes={cc.nodes} needs --executor slurm (local and debug run on "
                 "this machine)")
    return cc


def saved_config(path: str | Path) -> dict[str, Any]:
    """A run's saved config.yaml read through today's schema (keys added since then take
    their defaults, so older runs still resume), as a plain mapping. One that cannot be read
    is a ConfigError saying so: it is never taken for another config, or for none."""
    try:
        return asdict(_merge(TrainConfig(), load_yaml(path)))
    except ConfigError as e:
        raise ConfigError(f"the run's config is unreadable ({e}); nothing was changed: "
                          "restore it, or choose another --out") from None


def leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}: what a changed setting is called."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v and k != "options":
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Settings a resumed run may change: where the data lives (moved, or another machine's
# copy: a data set's files are checked by MD5, a folder's by its data.json), how it is read
# and when a run gives up on it; not what it computes. The resume rewrites config.yaml.
RESUME_MAY_CHANGE = ("data.data_dir", "data.max_bad_fraction", "data.workers")


def changes(saved: Mapping[str, Any], cfg: TrainConfig) -> list[str]:
    """What `cfg` asks differently from a run's saved config, as `key old -> new`. A request
    for `auto` precision matches whatever the run settled on (resuming keeps it), and with
    schedule.epochs the saved iterations are what those epochs came to. `preset` only names
    where the settings came from, and they are compared one by one, so a renamed preset
    (reproduce's `converge` scale became `short`) still resumes its runs; RESUME_MAY_CHANGE
    are not compared."""
    old, new = leaves(saved), leaves(asdict(cfg))
    for free in ("preset", *RESUME_MAY_CHANGE):
        old.pop(free, None)
        new.pop(free, None)
    if new["precision"] == "auto":
        new["precision"] = old.get("precision")
    if new.get("schedule.epochs") and new.get("schedule.epochs") == old.get("schedule.epochs"):
        new["schedule.iterations"] = old.get("schedule.iterations")
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
