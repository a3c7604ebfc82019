"""The archive of an experiment longer than one machine's life (`reproduce --archive DIR`),
a folder committed beside its report:

    DIR/
      <label>/          a finished sub-run's logs, the run directory's own files: config.yaml,
                        metrics.jsonl, eval.json (no weights); read instead of training the
                        sub-run again, never overwritten
      <label>.parked/   an unfinished sub-run as far as it got, a run directory to resume:
                        config.yaml, choices.json, metrics.jsonl, summary.csv,
                        checkpoints/latest and the one checkpoint it names

A sub-run is parked when Ctrl-C stops `reproduce` (the trainer saves a checkpoint first) and
by `reproduce ... --park`, which may run beside the training, e.g. before the machine goes.
The same command on the next machine copies a parked sub-run into its run directory there,
if that holds no checkpoint yet, and resumes it (issue 33: a ResNet-56 of 60 epochs takes
longer than a 2-core machine is lent). A parked copy is replaced only by a later checkpoint
of the same sub-run, and removed once the sub-run's finished logs are archived: superseded,
as the trainer removes a checkpoint once a later one is complete (train/checkpoint.py).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..config import TrainConfig, changes, saved_config, to_yaml
from ..errors import ConfigError
from ..report import MetricsLog
from ..runs import RunDir

log = logging.getLogger(__name__)

ARCHIVED = ("config", "metrics", "eval_report")  # the RunDir files a finished sub-run keeps
PARKED = ("config", "choices", "metrics", "summary")  # and the latest checkpoint


def _check_config(kept: RunDir, cfg: TrainConfig, what: str) -> None:
    saved = saved_config(kept.config)
    # Where the data set lies differs between machines and changes nothing it holds.
    saved["data"]["data_dir"] = cfg.data.data_dir
    if changes(saved, cfg):
        raise ConfigError(f"{kept.path} holds {what} of another configuration; "
                          "pass another --archive")


def in_archive(kept: RunDir, cfg: TrainConfig) -> bool:
    """Whether the archive holds this sub-run finished (of another config: an error)."""
    if not all(getattr(kept, f).is_file() for f in ARCHIVED):
        return False
    _check_config(kept, cfg, "the logs of a sub-run")
    return True


def archive_sub_run(run: RunDir, kept: RunDir) -> None:
    """Copy a finished run's logs into the archive, all of them or none: an archived sub-run
    is never overwritten (one that differs is kept, with a warning). Once the archive holds
    exactly this run's logs, its parked copy is superseded and goes."""
    if kept.path.exists():
        if any(not getattr(kept, f).is_file()
               or getattr(kept, f).read_bytes() != getattr(run, f).read_bytes()
               for f in ARCHIVED):
            log.warning("%s differs from the finished run in %s; the archive keeps its own",
                        kept.path, run.path)
            return
    else:
        part = kept.path.with_name(f".{kept.path.name}.partial")
        part.mkdir(parents=True, exist_ok=True)
        for f in ARCHIVED:
            shutil.copyfile(getattr(run, f), getattr(RunDir(part), f))
        part.rename(kept.path)
    if parked(kept).path.exists():
        shutil.rmtree(parked(kept).path)
        log.info("%s: removed, superseded by the finished sub-run's logs", parked(kept).path)


def parked(kept: RunDir) -> RunDir:
    """Where the archive parks the unfinished sub-run whose finished logs go to `kept`."""
    return RunDir(kept.path.with_name(kept.path.name + ".parked"))


def _iteration(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("ckpt-"))


def parked_iteration(kept: RunDir) -> int | None:
    """The iteration the archive's parked copy of this sub-run reached; None if none."""
    _restore_interrupted_swap(parked(kept))
    ckpt = parked(kept).latest_checkpoint()
    return None if ckpt is None else _iteration(ckpt)


def _aside(dest: RunDir, what: str) -> Path:
    return dest.path.with_name(f".{dest.path.name}.{what}")


def _restore_interrupted_swap(dest: RunDir) -> None:
    """A park killed between its two renames left the older copy aside: put it back."""
    old = _aside(dest, "old")
    if old.exists() and not dest.path.exists():
        old.rename(dest.path)


def _copy_run(run: RunDir, ckpt: Path, into: RunDir) -> None:
    """The files a run resumes from: its logs up to `ckpt`'s iteration, and `ckpt`."""
    into.checkpoints.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ckpt, into.checkpoints / ckpt.name, dirs_exist_ok=True)
    for f in PARKED:
        if getattr(run, f).is_file():
            shutil.copyfile(getattr(run, f), getattr(into, f))
    into.pointer.write_text(ckpt.name + "\n")
    MetricsLog(into).truncate_after(_iteration(ckpt))  # lines a resume would redo


def park(run: RunDir, kept: RunDir, cfg: TrainConfig) -> str:
    """Copy `run`'s latest checkpoint and logs into the archive as its parked copy; says what
    it did. Beside a training process: a checkpoint it prunes during the copy is retried from
    the next one."""
    dest = parked(kept)
    have = parked_iteration(kept)
    if dest.config.is_file():
        _check_config(dest, cfg, "a parked sub-run")
    for _ in range(3):
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            return "no checkpoint yet: nothing to park"
        it = _iteration(ckpt)
        if have is not None and have >= it:
            return (f"the archive's parked copy is at iteration {have:,} already" if have == it
                    else f"kept the archive's parked copy: at iteration {have:,}, past this "
                    f"run's {it:,} (move {run.path} away to resume from it)")
        tmp = RunDir(_aside(dest, "partial"))
        if tmp.path.exists():  # what a park killed midway left
            shutil.rmtree(tmp.path)
        try:
            _copy_run(run, ckpt, tmp)
        except FileNotFoundError:  # the trainer replaced that checkpoint meanwhile
            continue
        old = _aside(dest, "old")
        if dest.path.exists():
            dest.path.rename(old)
        tmp.path.rename(dest.path)
        if old.exists():  # superseded by the later checkpoint just parked
            shutil.rmtree(old)
        return f"parked at iteration {it:,} in {dest.path}"
    return "its checkpoints changed during each of 3 copies; nothing parked, try again"


def unpark(kept: RunDir, run: RunDir, cfg: TrainConfig) -> int | None:
    """Copy the archive's parked copy of this sub-run into `run`, to resume there; returns its
    iteration, or None if there is none or `run` is as far already. A `run` with an earlier
    checkpoint is refused: it is someone's work, and which to keep is theirs to say."""
    src = parked(kept)
    if parked_iteration(kept) is None:
        return None
    _check_config(src, cfg, "a parked sub-run")
    ckpt = src.latest_checkpoint()
    assert ckpt is not None
    it = _iteration(ckpt)
    with run.lock():
        mine = run.latest_checkpoint()
        if mine is not None:
            if _iteration(mine) >= it:
                return None
            raise ConfigError(f"{run.path} holds iteration {_iteration(mine):,} of this sub-run "
                              f"and the archive's parked copy iteration {it:,}; move "
                              f"{run.path} away to resume from the archive, or pass another "
                              "--out")
        _copy_run(src, ckpt, run)
        # config.yaml names this machine's data folder; the rest is the parked run's.
        head = src.config.read_text().splitlines(keepends=True)[0]
        run.config.write_text((head if head.startswith("#") else "") + to_yaml(cfg))
    return it
