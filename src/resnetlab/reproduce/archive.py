"""The archive of an experiment longer than one machine's life (`reproduce --archive DIR`),
a folder committed beside its report:

    DIR/
      <label>/          a finished sub-run's logs, the run directory's own files: config.yaml,
                        metrics.jsonl, eval.json (no weights); read instead of training the
                        sub-run again, never overwritten
      <label>.parked/   an unfinished sub-run as far as it got, a run directory to resume:
                        config.yaml, choices.json, metrics.jsonl, summary.csv,
                        checkpoints/latest and the one checkpoint it names
      .lock             held while a process changes the archive (seconds; left empty)

A sub-run is parked when Ctrl-C stops `reproduce` (the trainer saves a checkpoint first; with
--executor the jobs go on, and their latest checkpoints are parked) and by `reproduce ...
--park`, which may run beside the training, e.g. before the machine goes. The same command
on the next machine copies a parked sub-run into its run directory there, if that was not
started, and resumes it (issue 33: a ResNet-56 of 60 epochs takes longer than a 2-core
machine is lent). A parked copy is replaced only by a later checkpoint of the same sub-run,
and removed once the sub-run's finished logs, of its configuration, are archived:
superseded, as the trainer removes a checkpoint once a later one is complete
(train/checkpoint.py). Whatever else is found (a copy without a complete checkpoint, a run
started here that the archive is ahead of, another configuration's) is refused in one line
and kept.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..config import TrainConfig, changes, saved_config, to_yaml
from ..errors import ConfigError
from ..runs import RunDir, hold
from ..train.checkpoint import FILES as CHECKPOINT_FILES

log = logging.getLogger(__name__)

ARCHIVED = ("config", "metrics", "eval_report")  # the RunDir files a finished sub-run keeps
PARKED = ("config", "choices", "metrics", "summary")  # and the latest checkpoint
LOCK = ".lock"


def _check_config(kept: RunDir, cfg: TrainConfig, what: str,
                  hint: str = "pass another --archive") -> None:
    saved = saved_config(kept.config)
    # Where the data set lies differs between machines and changes nothing it holds.
    saved["data"]["data_dir"] = cfg.data.data_dir
    if changes(saved, cfg):
        raise ConfigError(f"{kept.path} holds {what} of another configuration; {hint}")


@contextlib.contextmanager
def _held(kept: RunDir) -> Iterator[None]:
    """One process at a time changes the archive (a --park beside the trainer's own), for
    seconds, so others wait. A POSIX lock (runs.hold) on DIR/.lock: a lock on the folder
    itself would fail on NFS, where a cluster's archive usually lies."""
    root = kept.path.parent
    root.mkdir(parents=True, exist_ok=True)
    with hold(root / LOCK, root, wait=True):
        yield


def in_archive(kept: RunDir, cfg: TrainConfig) -> bool:
    """Whether the archive holds this sub-run finished (of another config: an error)."""
    if not all(getattr(kept, f).is_file() for f in ARCHIVED):
        return False
    _check_config(kept, cfg, "the logs of a sub-run")
    return True


def archive_sub_run(run: RunDir, kept: RunDir, cfg: TrainConfig) -> None:
    """Copy a finished run's logs (of `cfg`) into the archive, all of them or none: an
    archived sub-run is never overwritten (one that differs is kept, with a warning). Once the
    archive holds exactly this run's logs, its parked copy is superseded and goes. An archive
    of another configuration (another --scale's, say) is refused before anything changes."""
    with _held(kept):
        dest = parked(kept)
        for there in (kept, dest, RunDir(_aside(dest, "old"))):
            if there.config.is_file():
                _check_config(there, cfg, "a sub-run")
        if kept.path.exists():
            if any(not getattr(kept, f).is_file()
                   or getattr(kept, f).read_bytes() != getattr(run, f).read_bytes()
                   for f in ARCHIVED):
                log.warning("%s differs from the finished run in %s; the archive keeps its "
                            "own", kept.path, run.path)
                return
        else:
            part = kept.path.with_name(f".{kept.path.name}.partial")
            part.mkdir(parents=True, exist_ok=True)
            for f in ARCHIVED:
                shutil.copyfile(getattr(run, f), getattr(RunDir(part), f))
            part.rename(kept.path)
        for superseded in (dest.path, _aside(dest, "old")):
            if superseded.exists():
                shutil.rmtree(superseded)
                log.info("%s: removed, superseded by the finished sub-run's logs", superseded)


def parked(kept: RunDir) -> RunDir:
    """Where the archive parks the unfinished sub-run whose finished logs go to `kept`."""
    return RunDir(kept.path.with_name(kept.path.name + ".parked"))


def _aside(dest: RunDir, what: str) -> Path:
    """`.partial`: a park's copy being made; `.old`: the copy it replaces, during the swap."""
    return dest.path.with_name(f".{dest.path.name}.{what}")


def _complete(ckpt: Path) -> bool:
    return all((ckpt / f).is_file() for f in CHECKPOINT_FILES)


def _latest(run: RunDir) -> Path | None:
    """The run's latest checkpoint if every file of it is there (a copy may lack one)."""
    ckpt = run.latest_checkpoint()
    return ckpt if ckpt is not None and _complete(ckpt) else None


def parked_iteration(kept: RunDir) -> int | None:
    """The iteration the archive's parked copy of this sub-run reached (that of the copy a
    park killed mid-swap set aside, if that is all there is); None if none. Reads only."""
    for path in (parked(kept).path, _aside(parked(kept), "old")):
        ckpt = _latest(RunDir(path))
        if ckpt is not None:
            return RunDir.iteration(ckpt)
    return None


def _tidy(dest: RunDir) -> None:
    """What a park killed midway left (under the archive's lock): a copy it was making goes;
    the copy it had set aside comes back, or goes if the one in place is later."""
    partial, old = _aside(dest, "partial"), _aside(dest, "old")
    if partial.exists():
        shutil.rmtree(partial)
    if not old.exists():
        return
    if not dest.path.exists():
        old.rename(dest.path)
        return
    was, now = _latest(RunDir(old)), _latest(dest)
    if now is None or (was is not None and RunDir.iteration(was) >= RunDir.iteration(now)):
        raise ConfigError(f"{old} and {dest.path} are two parked copies of one sub-run, and "
                          f"{dest.path.name} is not the later; move away the one to drop")
    shutil.rmtree(old)


def _copy_run(run: RunDir, ckpt: Path, into: RunDir) -> None:
    """The files a run resumes from: its logs and `ckpt`, which appears whole or not at all
    (copied under checkpoint.py's name for one being written, then renamed)."""
    into.checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = into.checkpoints / f".tmp-{ckpt.name}"
    if tmp.exists():  # a copy killed midway: checkpoint.py clears these too
        shutil.rmtree(tmp)
    shutil.copytree(ckpt, tmp)
    tmp.rename(into.checkpoints / ckpt.name)
    for f in PARKED:
        if getattr(run, f).is_file():
            shutil.copyfile(getattr(run, f), getattr(into, f))
    into.pointer.write_text(ckpt.name + "\n")


def park(run: RunDir, kept: RunDir, cfg: TrainConfig) -> str:
    """Copy `run`'s latest checkpoint and logs into the archive as its parked copy; says what
    it did. Beside a training process: a copy that lost a file to the trainer's pruning is
    made again from the next checkpoint."""
    dest = parked(kept)
    if run.config.is_file():
        _check_config(run, cfg, "a run", "give the --set values it was trained with")
    with _held(kept):
        if in_archive(kept, cfg):
            return "finished (its logs are in the archive): nothing to park"
        _tidy(dest)
        have = None
        if dest.path.exists():
            _check_config(dest, cfg, "a parked sub-run")
            ckpt = _latest(dest)
            if ckpt is None:
                raise ConfigError(f"{dest.path} holds no complete checkpoint; move it away "
                                  "to park this run there")
            have = RunDir.iteration(ckpt)
        tmp = RunDir(_aside(dest, "partial"))
        for _ in range(3):
            ckpt = run.latest_checkpoint()
            if ckpt is None:
                return "no checkpoint yet: nothing to park"
            it = RunDir.iteration(ckpt)
            if have is not None and have >= it:
                return (f"the archive's parked copy is at iteration {have:,} already"
                        if have == it else f"kept the archive's parked copy: at iteration "
                        f"{have:,}, past this run's {it:,} (move {run.path} away to resume "
                        "from it)")
            if tmp.path.exists():
                shutil.rmtree(tmp.path)
            try:
                _copy_run(run, ckpt, tmp)
            except OSError:  # shutil.Error too
                if _complete(ckpt):
                    raise  # not the trainer's pruning: a full disk, a permission
                continue
            if not _complete(tmp.checkpoints / ckpt.name):
                continue  # listed before the pruning took a file, copied after
            old = _aside(dest, "old")
            if dest.path.exists():
                dest.path.rename(old)
            tmp.path.rename(dest.path)
            if old.exists():  # superseded by the later checkpoint just parked
                shutil.rmtree(old)
            return f"parked at iteration {it:,} in {dest.path}"
        if tmp.path.exists():
            shutil.rmtree(tmp.path)
        return "its checkpoints changed during each of 3 copies; nothing parked, try again"


def _takes(run: RunDir, it: int) -> bool:
    """Whether `run` is to take a parked copy at iteration `it`: not if it is as far already
    (it may be training: a job's); one started here and behind is refused."""
    mine = run.latest_checkpoint()
    if mine is not None and RunDir.iteration(mine) >= it:
        return False
    if mine is not None or run.started() or run.checkpoint_dirs():
        at = f"iteration {RunDir.iteration(mine):,}" if mine else "no complete checkpoint"
        raise ConfigError(f"{run.path} holds {at} of this sub-run and the archive's parked "
                          f"copy iteration {it:,}; move {run.path} away to resume from the "
                          "archive, or pass another --out")
    return True


def unpark(kept: RunDir, run: RunDir, cfg: TrainConfig) -> int | None:
    """Copy the archive's parked copy of this sub-run into `run`, to resume there; returns its
    iteration, or None if there is none or `run` does not take it (`_takes`). Checked
    before the locks, which a training job holds, and again under them."""
    it = parked_iteration(kept)
    if it is None or not _takes(run, it):
        return None
    src = parked(kept)
    with _held(kept), run.lock():
        _tidy(src)
        ckpt = _latest(src)
        if ckpt is None or not _takes(run, RunDir.iteration(ckpt)):
            return None
        _check_config(src, cfg, "a parked sub-run")
        _copy_run(src, ckpt, run)
        # config.yaml names this machine's data folder; the rest is the parked run's.
        head = src.config.read_text().splitlines(keepends=True)[0]
        run.config.write_text((head if head.startswith("#") else "") + to_yaml(cfg))
    return RunDir.iteration(ckpt)
