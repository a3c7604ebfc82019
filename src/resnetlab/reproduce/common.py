"""What every experiment shares: scales, sub-runs (normal run directories), reports.

An experiment names the networks it needs; each is trained once per scale into
`<out>/runs/<label>/` by the ordinary trainer, so an interrupted `reproduce` resumes where
it stopped, a finished sub-run is never trained again, and experiments that need the same
network (degradation, responses and lesion all use ResNet-56) share one run.

An experiment longer than one machine's life (issue 33's schedules on a 2-core CPU) keeps
its sub-runs in an archive committed beside its report (reproduce.archive): finished ones'
logs, read back instead of training them again, and unfinished ones parked at their latest
checkpoint, resumed by the same command on the next machine. Finished sub-runs are archived
without weights, so the analyses that load a model (responses, lesion) train theirs where
they run.

With `--executor` (resnetlab.cluster) each unfinished sub-run is one submitit job (on SLURM,
one job array per experiment), whose scripts and logs go to `<out>/jobs/`; the report is
written when all have ended, and `--status` says where each stands without waiting.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import cluster
from ..config import ClusterConfig, TrainConfig, changes, resolve, saved_config
from ..data import build_data
from ..errors import ConfigError
from ..models.factory import create_model, load_model
from ..models.resnet import ResNet
from ..recipes import CifarNet, cifar_recipe
from ..report import MetricsLog
from ..runs import RunDir
from ..train.loop import train
from ..train.signals import stop_at_a_checkpoint
from .archive import archive_sub_run, in_archive, park, parked_iteration, unpark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSet:
    """What a scale's epochs and a verdict's chance level are computed from."""

    images: int  # the training split before any validation hold-out
    classes: int
    side: int  # image height and width
    channels: int

    @property
    def chance_error(self) -> float:
        return 1 - 1 / self.classes


TRAIN_SETS = {"fashion-mnist": TrainSet(60_000, 10, 28, 1),
              "cifar10": TrainSet(50_000, 10, 32, 3)}

# A verdict needs every compared net's test error below this fraction of chance's (45% on
# 10 classes): nets near chance differ by noise, and any ordering of them means nothing.
LEARNED_FRACTION = 0.5

# Training speed the time estimates of `reproduce EXPERIMENT --help` scale from: ResNet-20 on
# Fashion-MNIST in fp32, as the trainer measured it at the start of `--scale long` on a
# 2-core AMD EPYC Zen 4. Time per image grows with depth and pixels (Table 1's FLOPs).
REFERENCE_SPEED = 893.0  # images/s of ResNet-20 at 28x28x1
REFERENCE_CPU = "2 cores of an AMD EPYC Zen 4, fp32"


@dataclass(frozen=True)
class Scale:
    """How big every experiment is; the code path is the same at every scale."""

    name: str
    dataset: str
    iterations: int
    milestones: tuple[int, ...]  # lr / 10 at these iterations (paper: 32k and 48k of 64k)
    eval_every: int
    log_every: int
    batch_size: int
    val_split: int
    pad: int
    depths: tuple[int, ...]  # degradation (Fig. 6)
    response_depths: tuple[int, ...]  # Fig. 7
    pair_depths: tuple[int, ...]  # preact: v1 against v2 at these depths
    lesion_depth: int
    shortcut_depth: int
    gradient_depth: int
    gradient_steps: int  # "early in training" for the gradients experiment
    analysis_images: int  # test images scored per lesion and used for responses (0: all)
    lesion_draws: int  # random draws per k in the k-blocks lesion curve
    limit_train: int = 0
    limit_test: int = 0
    eval_batch_size: int = 1000
    test_curve_images: int = 0  # > 0: the curve's test points score this many images

    @property
    def train_images(self) -> int:
        return self.limit_train or TRAIN_SETS[self.dataset].images - self.val_split

    @property
    def epochs(self) -> float:
        return self.iterations * self.batch_size / self.train_images

    def describe(self) -> str:
        """'14.9 epochs: 7,000 iterations of batch 128 on 60,000 fashion-mnist images'."""
        return (f"{self.epochs:.1f} epochs: {self.iterations:,} iterations of batch "
                f"{self.batch_size} on {self.train_images:,} {self.dataset} images")

    def minutes(self, nets: Sequence[CifarNet]) -> float:
        """Training time of these sub-runs at REFERENCE_SPEED, evaluations left out."""
        pixels = (TRAIN_SETS[self.dataset].side / 28) ** 2
        per_image = sum(n.depth / 20 * pixels for n in nets) / REFERENCE_SPEED
        return self.iterations * self.batch_size * per_image / 60

    def train_config(self, net: CifarNet, data_dir: str | None = None,
                     sets: Sequence[str] = (), seed: int = 0) -> TrainConfig:
        """The paper's CIFAR recipe (sec. 4.2) with this scale's data set and sizes."""
        data: dict[str, Any] = {"dataset": self.dataset, "val_split": self.val_split,
                                "pad": self.pad, "limit_train": self.limit_train,
                                "limit_test": self.limit_test}
        if data_dir:
            data["data_dir"] = data_dir
        sizes = {"preset": f"reproduce-{self.name}", "seed": seed, "batch_size": self.batch_size,
                 "eval_batch_size": self.eval_batch_size, "data": data,
                 "eval_every": self.eval_every, "log_every": self.log_every,
                 "test_curve_images": self.test_curve_images,
                 "precision": "fp32"}  # as the paper, on every device
        recipe = cifar_recipe(net, self.iterations, self.milestones)
        return resolve(None, sets=sets, settings=[recipe, sizes])


# Fashion-MNIST for 3.8 epochs on a 2-core CPU, sized for degradation at 20 and 56
# layers with 3 seeds in about 2.5 hours (AVX2 AMD EPYC, fp32, measured at batch 128:
# ResNet-20 660 images/s, ResNet-56 227, plain-56 233, so 1,800 iterations take about
# 6 and 17 minutes, evaluations included). The paper's schedule shape: lr /10 at 50% and
# 75% of training. A 20-point test curve on a fixed 2,000 test images; the final error
# on all 10,000. Named `converge` until it was shown not to be (issue 33).
_SHORT = Scale("short", "fashion-mnist", iterations=1800, milestones=(900, 1350),
               eval_every=90, log_every=30, batch_size=128, val_split=0, pad=1,
               depths=(20, 56), response_depths=(20, 56), pair_depths=(20, 56),
               lesion_depth=56, shortcut_depth=20, gradient_depth=56,
               gradient_steps=100, analysis_images=2000, lesion_draws=5,
               test_curve_images=2000)

SCALES: dict[str, Scale] = {
    # Seconds, for the tests: tiny nets (6n+2 with n = 1, 2) on whatever data is given.
    "smoke": Scale("smoke", "fashion-mnist", iterations=6, milestones=(3, 5), eval_every=3,
                   log_every=2, batch_size=32, val_split=0, pad=1, depths=(8, 14),
                   response_depths=(8, 14), pair_depths=(8, 14), lesion_depth=14,
                   shortcut_depth=8, gradient_depth=14, gradient_steps=2, analysis_images=128,
                   lesion_draws=2, limit_train=256, limit_test=128, eval_batch_size=32,
                   test_curve_images=64),
    # Fashion-MNIST on a 2-core CPU: 800 iterations of batch 128 (1.7 epochs) per net, so the
    # eight degradation nets train in about an hour. All 60k images train (no val split:
    # nothing is tuned here); the test curve is scored on all 10k every 200 iterations.
    "cpu": Scale("cpu", "fashion-mnist", iterations=800, milestones=(400, 600),
                 eval_every=200, log_every=20, batch_size=128, val_split=0, pad=1,
                 depths=(20, 32, 44, 56), response_depths=(20, 56), pair_depths=(20, 56),
                 lesion_depth=56, shortcut_depth=20, gradient_depth=56, gradient_steps=100,
                 analysis_images=2000, lesion_draws=5),
    "short": _SHORT,
    # `short` four times as long (14.9 epochs): at 3.8 epochs ResNet-56 has not caught up
    # with ResNet-20 yet, its training error still falling faster (sec. 4.2's thesis is
    # about the optimisation, so the schedule must let the deeper net finish).
    "long": replace(_SHORT, name="long", iterations=7000, milestones=(3500, 5250),
                    eval_every=350, log_every=50),
    # `long` twice as long (29.9 epochs): at 14.9 epochs ResNet-56 only just reaches
    # ResNet-20's training error (0.05 points below, one seed; docs/results/degradation-long),
    # the gap still closing with each lr step, so the pilot goes on at twice the length.
    "longer": replace(_SHORT, name="longer", iterations=14000, milestones=(7000, 10500),
                      eval_every=700, log_every=50),
    # `longer` twice as long (59.7 epochs): at 29.9 epochs ResNet-56's training error is
    # 0.13 points below ResNet-20's, within 3 seeds' spread (0.83), the gap still growing
    # (docs/results/degradation-longer); about 3.7 h for ResNet-56 on 2 Zen 4 cores, so its
    # sub-runs cross machines through --archive's parked checkpoints.
    "longest": replace(_SHORT, name="longest", iterations=28000, milestones=(14000, 21000),
                       eval_every=1400, log_every=50),
    # The paper's schedule (sec. 4.2: 64k iterations of batch 128, lr /10 at 32k and 48k, the
    # 110-layer warm-up) on Fashion-MNIST's 60k images, 20 to 110 layers: issue 33's thesis
    # at the paper's length, for a lent GPU (tools/gpu_degradation.sh).
    "paper-fashion": replace(_SHORT, name="paper-fashion", iterations=64000,
                             milestones=(32000, 48000), eval_every=2000, log_every=100,
                             depths=(20, 56, 110), response_depths=(20, 56, 110),
                             pair_depths=(56, 110), lesion_depth=110, gradient_depth=110),
    # Paper sec. 4.2 on CIFAR-10: 64k iterations, 45k/5k split, lr /10 at 32k and 48k.
    "paper": Scale("paper", "cifar10", iterations=64000, milestones=(32000, 48000),
                   eval_every=1000, log_every=100, batch_size=128, val_split=5000, pad=4,
                   depths=(20, 32, 44, 56, 110), response_depths=(20, 56, 110),
                   pair_depths=(56, 110), lesion_depth=110, shortcut_depth=32,
                   gradient_depth=110, gradient_steps=400, analysis_images=0, lesion_draws=10),
}


# Old names of scales whose names turned out to claim too much.
RENAMED = {"converge": "short"}


def get_scale(name: str) -> Scale:
    if name in RENAMED:
        new = SCALES[RENAMED[name]]
        raise ConfigError(f"scale {name!r} is now called {new.name!r} ({new.describe()}); "
                          f"pass --scale {new.name} (add --out runs/reproduce/{name} to reuse "
                          "the runs made under the old name)")
    if name not in SCALES:
        raise ConfigError(f"unknown scale {name!r}; choose one of {', '.join(SCALES)}")
    return SCALES[name]


@dataclass
class Context:
    """Where an experiment reads and writes, and how it reports progress."""

    scale: Scale
    out: Path  # <out>/runs/<label>/ for sub-runs, <out>/<experiment>/ for reports
    data_dir: str | None = None
    sets: Sequence[str] = ()  # --set overrides applied to every sub-run (e.g. data.verify=false)
    progress: bool | None = None  # tqdm bars of the trainer (None: when stderr is a terminal)
    say: Callable[[str], None] = log.info
    seeds: int = 1  # sub-runs per network in the experiments that compare errors
    jobs: int = 1  # sub-runs trained at once, each in its own process
    archive: Path | None = None  # finished sub-runs' logs, read and added to (module doc)
    # sub-runs per plain network (None: `seeds`); the plain twins are the control, and one
    # seed of each can carry the degradation where the residual nets' gap needs three
    plain_seeds: int | None = None
    cluster: ClusterConfig | None = None  # --executor: sub-runs as submitit jobs

    def __post_init__(self) -> None:
        if self.plain_seeds is not None and not 1 <= self.plain_seeds <= self.seeds:
            raise ConfigError(f"--plain-seeds {self.plain_seeds} is not within 1..--seeds "
                              f"{self.seeds}; the plain nets are the control: give them at "
                              "most as many")
        if self.plain_seeds == self.seeds:
            self.plain_seeds = None

    def seeds_of(self, net: CifarNet) -> int:
        return self.plain_seeds if net.plain and self.plain_seeds is not None else self.seeds

    def config(self, net: CifarNet, seed: int = 0) -> TrainConfig:
        return self.scale.train_config(net, self.data_dir, self.sets, seed)

    @staticmethod
    def label(net: CifarNet, seed: int = 0) -> str:
        """Seed 0 keeps the plain label, so runs made before seeds existed are reused."""
        return net.label if seed == 0 else f"{net.label}-seed{seed}"

    def run_dir(self, net: CifarNet, seed: int = 0) -> Path:
        return self.out / "runs" / self.label(net, seed)

    def archived(self, net: CifarNet, seed: int = 0) -> RunDir | None:
        """Where the archive keeps this sub-run's logs; None without an archive."""
        return None if self.archive is None else RunDir(self.archive / self.label(net, seed))

    @property
    def jobs_dir(self) -> Path:
        """submitit's folder of the sub-runs' jobs (cluster's module doc)."""
        return self.out / "jobs"

    def report_dir(self, experiment: str) -> Path:
        path = self.out / experiment
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class SubRun:
    """A finished sub-run: its directory, final test error and metric records."""

    net: CifarNet
    run_dir: Path
    test_error: float
    records: list[dict[str, Any]]
    seed: int = 0
    seconds: float | None = None  # training time, summed over resumes (eval.json)
    precision: str = "fp32"  # what the run trained in (eval.json), whatever was asked
    device: str | None = None  # the CPU or GPU it finished on (eval.json; older runs: None)

    def model(self) -> ResNet:
        return load_model(RunDir(self.run_dir).final)

    def architecture(self, dataset: str) -> ResNet:
        """The untrained network, as it was built for `dataset` (an archived sub-run has no
        weights to load, and counting parameters needs none)."""
        data = TRAIN_SETS[dataset]
        return create_model(f"resnet{self.net.depth}", num_classes=data.classes,
                            in_chans=data.channels, **self.net.options)


def _finished(run: RunDir, cfg: TrainConfig) -> bool:
    if not run.finished():
        return False
    if changes(saved_config(run.config), cfg):
        raise ConfigError(f"{run.path} holds a finished run of another configuration; "
                          "remove it or pass another --out")
    return True


def load_sub_run(net: CifarNet, run: RunDir, seed: int) -> SubRun:
    """A finished sub-run as its eval.json and metrics hold it."""
    report = json.loads(run.eval_report.read_text())
    seconds = report.get("train_seconds")
    return SubRun(net, run.path, float(report["top1_error"]), MetricsLog(run).records(), seed,
                  None if seconds is None else float(seconds), report.get("precision", "fp32"),
                  report.get("device"))


def finished_sub_run(ctx: Context, net: CifarNet, seed: int = 0,
                     weights: bool = False) -> SubRun | None:
    """The sub-run as finished under ctx.out, else as ctx.archive holds it (unless its
    `weights` are needed); None if neither. One of another configuration is an error."""
    cfg, run = ctx.config(net, seed), RunDir(ctx.run_dir(net, seed))
    if _finished(run, cfg):
        return load_sub_run(net, run, seed)
    kept = ctx.archived(net, seed)
    if kept is not None and not weights and in_archive(kept, cfg):
        return load_sub_run(net, kept, seed)
    return None


def ensure_seeds(ctx: Context, nets: Sequence[CifarNet], seeds: int | None = None,
                 weights: bool = False) -> dict[CifarNet, list[SubRun]]:
    """Train each net with seeds 0..seeds-1 (default ctx.seeds_of(net)) where not yet
    finished (resuming interrupted sub-runs), one progress line each. Every net's seed 0
    comes first, so a partial run already answers with one seed. With ctx.jobs > 1 the
    unfinished sub-runs train that many at a time, each in its own process; with
    ctx.cluster, each is a submitit job (`_train_cluster`). Sub-runs in
    ctx.archive count as finished unless `weights` are needed, and every sub-run finished
    here is added to it as soon as it is (an interrupted experiment loses none); one parked
    there resumes from its checkpoint, and on Ctrl-C each stopped sub-run is parked."""
    count = _seed_counts(ctx, nets, seeds)
    done: dict[tuple[CifarNet, int], SubRun] = {}
    todo: list[tuple[str, CifarNet, int]] = []
    for head, net, seed in plan(ctx, nets, seeds):
        sub = finished_sub_run(ctx, net, seed, weights)
        if sub is None:
            todo.append((head, net, seed))
            continue
        done[net, seed] = _kept(ctx, sub)
        where = ("already trained" if sub.run_dir == ctx.run_dir(net, seed)
                 else f"read from the archive {sub.run_dir}")
        ctx.say(f"{head}: {where}, test error {100 * sub.test_error:.2f}%")
    train_todo = (_train_cluster if ctx.cluster else
                  _train_each if ctx.jobs == 1 or len(todo) < 2 else _train_parallel)
    for head, net, seed in todo:
        _unpark(ctx, head, net, seed)
    try:
        if todo:
            train_todo(ctx, todo, done)
    except KeyboardInterrupt:  # the stopped sub-runs saved checkpoints: the archive takes them
        for head, message in park_sub_runs(ctx, [(h, n, s) for h, n, s in todo
                                                 if (n, s) not in done]):
            ctx.say(f"{head}: {message}")
        raise
    return {net: [done[net, seed] for seed in range(count[net])] for net in nets}


def _unpark(ctx: Context, head: str, net: CifarNet, seed: int) -> None:
    kept = ctx.archived(net, seed)
    if kept is None:
        return
    it = unpark(kept, RunDir(ctx.run_dir(net, seed)), ctx.config(net, seed))
    if it is not None:
        ctx.say(f"{head}: taken from the archive's parked copy at iteration {it:,}")


def park_sub_runs(ctx: Context, todo: Sequence[tuple[str, CifarNet, int]]
                  ) -> list[tuple[str, str]]:
    """(head, what happened) for each sub-run of `todo`: an unfinished one's latest
    checkpoint is copied into ctx.archive (reproduce.archive); none without an archive."""
    if ctx.archive is None:
        return []
    said = []
    for head, net, seed in todo:
        cfg, run, kept = ctx.config(net, seed), RunDir(ctx.run_dir(net, seed)), ctx.archived(
            net, seed)
        assert kept is not None
        try:
            if _finished(run, cfg):  # e.g. while --jobs stopped: archived, as any finished
                _kept(ctx, load_sub_run(net, run, seed))
                said.append((head, "finished: its logs are in the archive"))
            else:
                said.append((head, park(run, kept, cfg)))
        except ConfigError as e:  # the others are parked all the same
            said.append((head, f"refused: {e}"))
    return said


def _seed_counts(ctx: Context, nets: Sequence[CifarNet], seeds: int | None
                 ) -> dict[CifarNet, int]:
    return {net: ctx.seeds_of(net) if seeds is None else seeds for net in nets}


def plan(ctx: Context, nets: Sequence[CifarNet], seeds: int | None = None
         ) -> list[tuple[str, CifarNet, int]]:
    """The sub-runs of `nets`, in training order (every net's seed 0 first), each with its
    progress head ("[2/8] resnet56 seed 1")."""
    count = _seed_counts(ctx, nets, seeds)
    order = [(net, seed) for seed in range(max(count.values(), default=0)) for net in nets
             if seed < count[net]]
    return [(f"[{i}/{len(order)}] {net.label}" + (f" seed {seed}" if count[net] > 1 else ""),
             net, seed) for i, (net, seed) in enumerate(order, 1)]


def sub_run_states(ctx: Context, nets: Sequence[CifarNet], seeds: int | None = None
                   ) -> list[tuple[str, str]]:
    """(head, where it stands) of each sub-run, without waiting: done (with its test error),
    a job's state (pending, running, failed; `--executor`), started (a checkpoint to
    resume from) or not started."""
    jobs = cluster.read_jobs(ctx.jobs_dir)
    states = []
    for head, net, seed in plan(ctx, nets, seeds):
        sub = finished_sub_run(ctx, net, seed)
        label, run = ctx.label(net, seed), RunDir(ctx.run_dir(net, seed))
        if sub is not None:
            state = f"done, test error {100 * sub.test_error:.2f}%"
        elif label in jobs:
            entry = jobs[label]
            state = (f"{cluster.job_state(ctx.jobs_dir, entry)} ({entry['executor']} job "
                     f"{entry['job_id']})")
        else:
            ckpt = run.latest_checkpoint()
            state = (f"started, resumable from iteration {RunDir.iteration(ckpt):,}" if ckpt
                     else "started, no complete checkpoint yet"
                     if run.started() or run.checkpoint_dirs() else "not started")
            kept = ctx.archived(net, seed)
            it = None if kept is None else parked_iteration(kept)
            if it is not None:
                state += f"; parked in the archive at iteration {it:,}"
        states.append((head, state))
    return states


def _kept(ctx: Context, sub: SubRun) -> SubRun:
    """A sub-run finished here, added to ctx.archive (if any)."""
    kept = ctx.archived(sub.net, sub.seed)
    if kept is not None and sub.run_dir != kept.path:
        archive_sub_run(RunDir(sub.run_dir), kept, ctx.config(sub.net, sub.seed))
    return sub


def _starting(ctx: Context, head: str, cfg: TrainConfig, run: RunDir,
              queued: bool = False) -> None:
    what = "resuming" if run.checkpoints.exists() else "training"
    ctx.say(f"{head}: {'queued for ' if queued else ''}{what} "
            f"({cfg.schedule.iterations} iterations) in {run.path}")


def _train_each(ctx: Context, todo: Sequence[tuple[str, CifarNet, int]],
                done: dict[tuple[CifarNet, int], SubRun]) -> None:
    for head, net, seed in todo:
        cfg, run = ctx.config(net, seed), RunDir(ctx.run_dir(net, seed))
        _starting(ctx, head, cfg, run)
        t0 = time.perf_counter()
        train(cfg, run.path, resume=True, progress=ctx.progress)
        done[net, seed] = _kept(ctx, load_sub_run(net, run, seed))
        ctx.say(f"{head}: test error {100 * done[net, seed].test_error:.2f}% "
                f"({(time.perf_counter() - t0) / 60:.1f} min)")


_stop: Any = None  # in a worker of --jobs: the pool's Event, set once Ctrl-C stops it


def _worker_init(stop: Any) -> None:
    """A --jobs worker ignores Ctrl-C except while it trains (`_train_in_worker`): one idle
    when it comes would die, and the pool, broken, would kill the others mid-save."""
    global _stop
    _stop = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _train_in_worker(cfg: TrainConfig, path: Path, threads: int) -> tuple[float, int]:
    """One sub-run in a worker process of --jobs, on its share of the CPU threads; none
    starts once the pool is stopped. Ctrl-C or SIGTERM stops it at a checkpoint; idle
    again, it ignores Ctrl-C, and SIGTERM is the pool's to end it with."""
    if _stop is not None and _stop.is_set():
        raise KeyboardInterrupt
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    with stop_at_a_checkpoint(respect_ignored=False):
        train(cfg, path, resume=True, progress=False)
    return time.perf_counter() - t0, os.getpid()


def _train_parallel(ctx: Context, todo: Sequence[tuple[str, CifarNet, int]],
                    done: dict[tuple[CifarNet, int], SubRun]) -> None:
    """--jobs: on a GPU, N processes share it; on a CPU each takes cores/N threads (on the
    2-core AMD EPYC Zen 4, fp32: ResNet-20 at 455 images/s in each of 2 processes against
    885 in one process of 2 threads, 3% more, all it buys there). Spawned,
    not forked: a fork of a process that has run torch's thread pool can hang. A sub-run
    that fails does not stop the others; the first error is raised when all have ended,
    and every sub-run keeps its checkpoints for the next attempt. Ctrl-C stops every
    sub-run at a checkpoint (the workers are signalled too, if the terminal did not) and
    starts no other."""
    threads = max(1, torch.get_num_threads() // ctx.jobs)
    ctx.say(f"training {len(todo)} sub-runs, {ctx.jobs} at a time in worker processes "
            f"of {threads} thread{'s' if threads > 1 else ''} each")
    errors: list[BaseException] = []
    spawn = multiprocessing.get_context("spawn")
    stop = spawn.Event()
    with ProcessPoolExecutor(ctx.jobs, mp_context=spawn, initializer=_worker_init,
                             initargs=(stop,)) as pool:
        futures = {}
        for head, net, seed in todo:
            cfg, run = ctx.config(net, seed), RunDir(ctx.run_dir(net, seed))
            _starting(ctx, head, cfg, run, queued=True)
            futures[pool.submit(_train_in_worker, cfg, run.path, threads)] = head, net, seed
        try:
            _collect(ctx, futures, done, errors)
        except KeyboardInterrupt:
            stop.set()
            for worker in multiprocessing.active_children():  # the pool's, spawned here
                if worker.pid is not None:
                    os.kill(worker.pid, signal.SIGINT)
            pool.shutdown(cancel_futures=True)
            raise
    if errors:
        raise errors[0]


def _collect(ctx: Context, futures: dict[Any, tuple[str, CifarNet, int]],
             done: dict[tuple[CifarNet, int], SubRun], errors: list[BaseException]) -> None:
    """The --jobs sub-runs as they finish; a failed one is said and kept in `errors`."""
    for fut in as_completed(futures):
        head, net, seed = futures[fut]
        try:
            seconds, pid = fut.result()
        except Exception as e:  # the others go on; raised by the caller
            ctx.say(f"{head}: failed: {e}")
            errors.append(e)
            continue
        done[net, seed] = _kept(ctx, load_sub_run(net, RunDir(ctx.run_dir(net, seed)), seed))
        ctx.say(f"{head}: test error {100 * done[net, seed].test_error:.2f}% "
                f"({seconds / 60:.1f} min, process {pid})")


def _train_cluster(ctx: Context, todo: Sequence[tuple[str, CifarNet, int]],
                   done: dict[tuple[CifarNet, int], SubRun]) -> None:
    """--executor: each sub-run one submitit job on cpus_per_task threads (on SLURM, one
    array); as with --jobs, a failed sub-run does not stop the others, and the first error
    is raised when all have ended."""
    cc = ctx.cluster
    assert cc is not None
    heads = {ctx.label(net, seed): (head, net, seed) for head, net, seed in todo}
    jobs = []
    for label, (head, net, seed) in heads.items():
        cfg, run = ctx.config(net, seed), RunDir(ctx.run_dir(net, seed))
        _starting(ctx, head, cfg, run, queued=True)
        jobs.append((label, cluster.TrainJob(cfg, str(run.path.resolve()), cc.cpus_per_task)))
    errors: list[BaseException] = []
    for label, outcome in cluster.run_jobs(cc, ctx.jobs_dir, jobs, ctx.say):
        head, net, seed = heads[label]
        if not isinstance(outcome, BaseException):
            try:  # a run the job left unreadable fails as a failed job does
                done[net, seed] = _kept(ctx, load_sub_run(net, RunDir(ctx.run_dir(net, seed)),
                                                          seed))
            except Exception as e:
                outcome = e
        if isinstance(outcome, BaseException):  # the others go on; raised below
            ctx.say(f"{head}: failed: {outcome}")
            errors.append(outcome)
            continue
        seconds = outcome["seconds"] or 0.0
        ctx.say(f"{head}: test error {100 * done[net, seed].test_error:.2f}% "
                f"({seconds / 60:.1f} min, {cc.executor} job)")
    if errors:
        raise errors[0]


def ensure_trained(ctx: Context, nets: Sequence[CifarNet]) -> dict[CifarNet, SubRun]:
    """Seed 0 of each net: what the analyses (responses, lesion) measure."""
    return {net: runs[0] for net, runs in ensure_seeds(ctx, nets, seeds=1, weights=True).items()}


@dataclass(frozen=True)
class Spread:
    """One number over seeds: every seed's value, their mean and standard deviation."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def pct(self) -> str:
        """'7.10 ± 0.10 (7.00, 7.20, 7.10)' in percent; one seed: just the number."""
        if len(self.values) == 1:
            return f"{100 * self.mean:.2f}"
        each = ", ".join(f"{100 * v:.2f}" for v in self.values)
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f} ({each})"


def compare(a: Spread, b: Spread) -> int:
    """-1 if a is lower than b, 1 if higher, 0 if the difference of the means is within
    the seeds' spread (the sum of the two standard deviations): not distinguishable.
    With one seed each there is no spread, and any difference counts."""
    diff = a.mean - b.mean
    if abs(diff) <= a.std + b.std:
        return 0
    return -1 if diff < 0 else 1


TOO_SHORT = "**too short to tell**"


def must_learn(runs: Iterable[SubRun]) -> list[SubRun]:
    """The sub-runs whose learning earns an experiment its verdicts: every residual net and
    the shallowest plain net. A deeper plain net that does not learn is the degradation the
    paper shows (Fig. 6: plain-110 above 60%), judged with the rest, not a reason to
    withhold the verdicts."""
    runs = list(runs)
    shallowest = min((r.net.depth for r in runs if r.net.plain), default=None)
    return [r for r in runs if not r.net.plain or r.net.depth == shallowest]


def _named(runs: Iterable[SubRun]) -> str:
    return ", ".join(f"{r.net.label}" + (f" seed {r.seed}" if r.seed else "")
                     + f" {100 * r.test_error:.1f}%" for r in runs)


def judged(runs: Iterable[SubRun], dataset: str, verdicts: Callable[[], list[str]]) -> list[str]:
    """An experiment's verdicts, after the check that earns them: every sub-run that must
    learn (must_learn) did (test error below LEARNED_FRACTION of chance's). Otherwise one
    line saying the scale is too short to tell, and no verdict."""
    runs = list(runs)
    data = TRAIN_SETS[dataset]
    bar = LEARNED_FRACTION * data.chance_error
    chance = (f"{LEARNED_FRACTION:g} × the {100 * data.chance_error:.0f}% error of chance on "
              f"{data.classes} classes")
    needed = must_learn(runs)
    failed = [r for r in needed if r.test_error >= bar]
    if failed:
        return [f"- Verdicts: {TOO_SHORT}. {_named(failed)} ended at or above "
                f"{100 * bar:.0f}% test error ({chance}), so nothing here is judged. Train "
                "longer: a larger --scale."]
    errs = [100 * r.test_error for r in needed]
    lines = [f"- Every net learned: test errors {min(errs):.2f}-{max(errs):.2f}%, below the "
             f"{100 * bar:.0f}% a verdict needs ({chance})."]
    ids = {id(r) for r in needed}
    stuck = [r for r in runs if id(r) not in ids and r.test_error >= bar]
    if stuck:
        lines[0] = lines[0].replace("Every net learned", "Every residual net and the "
                                    "shallowest plain net learned")
        lines.append(f"- {_named(stuck)} ended at or above {100 * bar:.0f}%: the deeper plain "
                     "nets' degradation (Fig. 6: plain-110 above 60%), judged below.")
    return [*lines, *verdicts()]


def training_times(runs: dict[CifarNet, list[SubRun]]) -> tuple[str, dict[str, list[float]]]:
    """A report line with each network's training time (mean over seeds) and median logged
    speed, and the raw minutes per seed, from the sub-runs' eval.json and metrics. The time
    includes evaluations and any other work that shared the CPU; the median speed is robust to
    such work during part of a run."""
    minutes = {net.label: [r.seconds / 60 for r in rs if r.seconds is not None]
               for net, rs in runs.items()}
    speed = {net.label: statistics.median(s) for net, rs in runs.items()
             if (s := [r["images_per_s"] for run in rs for r in run.records
                       if r["kind"] == "train" and r.get("images_per_s")])}
    known = {k: v for k, v in minutes.items() if v}
    line = ("Training time per sub-run, as each run recorded it (mean over seeds), and the "
            "median speed of its logged windows: "
            + ", ".join(f"{k} {statistics.fmean(v):.1f} min"
                        + (f" ({speed[k]:.0f} images/s)" if k in speed else "")
                        for k, v in known.items()) + "." if known else "")
    return (line + devices(r for rs in runs.values() for r in rs) if line else ""), minutes


def devices(runs: Iterable[SubRun]) -> str:
    """' Trained on: X (resnet20, resnet56); Y (plain20).' from what each sub-run recorded:
    an archive gathers sub-runs from several machines, and their times differ with the CPU."""
    on: dict[str, list[str]] = {}
    for r in runs:
        on.setdefault(r.device or "a device not recorded (before eval.json named it)",
                      []).append(r.net.label + (f" seed {r.seed}" if r.seed else ""))
    return (" Trained on: " + "; ".join(f"{d} ({', '.join(labels)})"
                                        for d, labels in on.items()) + ".") if on else ""


def precision_of(runs: Iterable[SubRun]) -> str:
    """The precision(s) the sub-runs trained in, as each recorded it: what a report states."""
    return ", ".join(sorted({r.precision for r in runs})) or "fp32"


def analysis_tensors(ctx: Context, net: CifarNet) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale's analysis images of the test split, normalised as the sub-run trained."""
    cfg = ctx.config(net)
    data = build_data(cfg.data, cfg.batch_size, cfg.eval_batch_size, cfg.seed,
                      channels_last=False)
    xs, ys = zip(*data.test.batches(0), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    n = ctx.scale.analysis_images or len(y)
    return x[:n], y[:n]


@torch.inference_mode()
def error_rate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
               batch: int = 1000) -> float:
    model.eval()
    wrong = sum(int((model(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum())
                for i in range(0, len(y), batch))
    return wrong / len(y)


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def trained_sizes(ctx: Context) -> str:
    """What each sub-run trained with, read from its resolved config, so that a --set (say
    optim.lr) shows as what was used. The recipe and the --sets are the same for every
    network, but for the warm-up of the deepest (WARMUP_DEPTH), so the shallowest stands
    for all."""
    cfg = ctx.config(CifarNet(min(ctx.scale.depths)))
    sched = cfg.schedule
    steps = (f", /{1 / sched.gamma:g} at {' and '.join(f'{m:,}' for m in sched.milestones)}"
             if sched.kind == "multistep" and sched.milestones else f", {sched.kind}")
    images = cfg.data.limit_train or TRAIN_SETS[cfg.data.dataset].images - cfg.data.val_split
    return (f"{sched.iterations * cfg.batch_size / images:.1f} epochs ({sched.iterations:,} "
            f"iterations of batch {cfg.batch_size} on {images:,} {cfg.data.dataset} images) per "
            f"network (lr {cfg.optim.lr:g}{steps})")


def write_report(folder: Path, title: str, body: Sequence[str], results: dict[str, Any],
                 ctx: Context, sizes: str | None = None, precision: str | None = "fp32",
                 plain_nets: bool = False, first_seed_only: bool = False) -> Path:
    """report.md (title, what was run, body) and results.json (the raw numbers).
    `precision` is what the sub-runs recorded (fp32 unless a --set asked for another);
    None where nothing trains. `plain_nets`: the experiment compared seeds of plain nets,
    so --plain-seeds is part of how it was made. `first_seed_only`: an analysis of seed 0
    of each network (ensure_trained), whatever --seeds trained."""
    scale, seeds, jobs = ctx.scale, ctx.seeds, ctx.jobs
    plain = ctx.plain_seeds if plain_nets else None
    executor = ctx.cluster.executor if ctx.cluster else None
    (folder / "results.json").write_text(json.dumps(
        {"scale": scale.name, "seeds": seeds, "jobs": jobs, "precision": precision,
         **({"plain_seeds": plain} if plain is not None else {}),
         **({"executor": executor} if executor else {}),
         "sets": list(ctx.sets), **results}, indent=2) + "\n")
    runs = (f", {seeds} seed{'s' if seeds > 1 else ''} per network"
            + (f" ({plain} per plain network)" if plain is not None else ""))
    if first_seed_only:
        runs = ", seed 0 of each network" + (f" (of the {seeds} trained)" if seeds > 1 else "")
    flag = ((f" --seeds {seeds}" if seeds > 1 else "")
            + (f" --plain-seeds {plain}" if plain is not None else "")
            + (f" --jobs {jobs}" if jobs > 1 else "")
            + (f" --executor {executor}" if executor else "")
            + (f" --archive {ctx.archive}" if ctx.archive else "")
            + "".join(f" --set {s}" for s in ctx.sets))
    trained = ("" if precision is None else
               f"; {precision} training{' (as the paper)' if precision == 'fp32' else ''}")
    head = [f"# {title}", "",
            f"Scale `{scale.name}`: {sizes or trained_sizes(ctx)}{runs}{trained}; made by "
            f"`resnetlab reproduce {folder.name} --scale {scale.name}{flag}`. "
            "Raw numbers: [results.json](results.json).", ""]
    path = folder / "report.md"
    path.write_text("\n".join(head + list(body)) + "\n")
    return path
