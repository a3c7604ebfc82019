"""The run directory: every file a training run leaves, by name, in this one place.

    RUN/
      config.yaml               the resolved TrainConfig as asked (precision: auto stays auto);
                                `--config` reads it back
      choices.json              what `auto` settings became on this machine, and why
      data.json                 an image folder run's training files: count and digest
                                (resuming or evaluating on a changed folder is refused)
      metrics.jsonl             one line per logged step and per evaluation (report.py)
      summary.csv               one row per evaluation
      checkpoints/latest        names the newest complete checkpoint (train/checkpoint.py)
      checkpoints/ckpt-<it>/    its weights (model.safetensors + config.json), trainer_state.pt;
                                an unfinished run's eval reports and export/ go beside them
      checkpoints/replaced-ckpt-<it>/   a checkpoint saved again, kept for what was beside it
      final/                    the weights to ship, as `save_weights` writes them
      final/export/             graphs of those weights and their precision checks (deploy/)
      final/eval-<split>-<tta>[-recomputed-bn][-on-<data>][-<backend>-<precision>].json
                                reports of `resnetlab eval` (the last suffix unless PyTorch
                                fp32 scored it)
      eval.json                 the final test report; confusion.png, curves.png its figures
      tensorboard/              TensorBoard event files (log.tensorboard=true; report.py)
      .lock                     who is training in it now (RunDir.lock)
      jobs/                     `train --executor`: the job's script, pickles and logs
                                (resnetlab.cluster)

A weights directory outside any run (`save_weights`) has the same `export/` and eval reports.
`run_config` and `run_data` give the config and the data a run's weights were trained on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig, load_yaml, resolve
from .data import DataBundle, TrainImages, build_data
from .data.sources import DataError
from .errors import ConfigError, WeightsError
from .models.config import CONFIG_FILE, ModelConfig

STATE_FILE = "trainer_state.pt"  # inside each checkpoint, beside its weights
_EXPORT = "export"
_HELD: dict[Path, str] = {}  # lock files this process holds -> who holds them


def _in_use(path: Path, holder: str) -> ConfigError:
    return ConfigError(f"{path} is in use by {holder}; wait for it to end or choose "
                       "another --out")


@contextlib.contextmanager
def hold(lock_file: Path, what: Path, wait: bool = False) -> Iterator[None]:
    """Hold `what` for this process through `lock_file`: another process, or another hold
    in this one, is refused in one line naming the holder (with `wait`, another process's
    hold is waited for instead: for holds of seconds).

    A POSIX record lock (lockf): the kernel drops it when its holder dies, so a killed
    process leaves no stale lock, and forked children (DataLoader workers, which outlive a
    SIGKILLed trainer by seconds) do not inherit it, as they would an flock. Such locks do
    not exclude the process that holds them, so this process's own holds are kept in _HELD;
    and closing any descriptor of the file would drop the lock, so nothing else here opens
    it while it is held.
    """
    key = lock_file.resolve()
    if key in _HELD:
        raise _in_use(what, _HELD[key])
    with open(lock_file, "a+") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            f.seek(0)
            raise _in_use(what, f.read().strip() or "another process") from None
        holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.seek(0)
        f.truncate()
        f.write(holder + "\n")
        f.flush()
        _HELD[key] = holder
        try:
            yield
        finally:
            del _HELD[key]
            f.truncate(0)


class _In:
    """A path below the run directory: `RunDir(p).config` is `p / "config.yaml"`."""

    def __init__(self, *parts: str) -> None:
        self.parts = parts

    def __get__(self, run: RunDir, owner: type | None = None) -> Path:
        return run.path.joinpath(*self.parts)


@dataclass(frozen=True)
class RunDir:
    """The files of the training run in `path` (which need not exist yet)."""

    path: Path
    config = _In("config.yaml")
    choices = _In("choices.json")  # {"precision": ..., "reason": ...}: auto resolved here
    data = _In("data.json")  # an image folder's training files when the run started
    metrics = _In("metrics.jsonl")
    summary = _In("summary.csv")
    checkpoints = _In("checkpoints")
    pointer = _In("checkpoints", "latest")  # names the newest complete checkpoint
    jobs = _In("jobs")  # submitit's folder of `train --executor`
    final = _In("final")
    eval_report = _In("eval.json")
    curves = _In("curves.png")
    confusion = _In("confusion.png")
    tensorboard = _In("tensorboard")
    lock_file = _In(".lock")  # who holds the run (see lock())

    def __init__(self, path: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "path", Path(path))

    def checkpoint(self, iteration: int) -> Path:
        return self.checkpoints / f"ckpt-{iteration:08d}"

    def replaced(self, checkpoint: Path) -> Path:
        """Where a checkpoint saved again is kept if it holds others' files (checkpoint.py):
        replaced-ckpt-<it>, then -2, -3 ... if saved again more than once."""
        path, n = self.checkpoints / f"replaced-{checkpoint.name}", 1
        while path.exists():
            n += 1
            path = self.checkpoints / f"replaced-{checkpoint.name}-{n}"
        return path

    @staticmethod
    def iteration(checkpoint: Path) -> int:
        """The iteration a checkpoint directory (`checkpoint(it)`) was saved at."""
        return int(checkpoint.name.removeprefix("ckpt-"))

    def checkpoint_dirs(self) -> list[Path]:
        """Every checkpoint directory, oldest first."""
        return sorted(self.checkpoints.glob("ckpt-*"))

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names if it is complete; when the pointer is missing,
        unreadable or names no complete checkpoint (a user's rm, a copy that left it out),
        the newest complete checkpoint there is: existing work is never taken for none."""
        try:
            named = self.checkpoints / self.pointer.read_text().strip()
            if named.parent == self.checkpoints and (named / STATE_FILE).is_file():
                return named
        except (OSError, UnicodeDecodeError):
            pass
        complete = [d for d in self.checkpoint_dirs() if (d / STATE_FILE).is_file()]
        return complete[-1] if complete else None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run for one process: another is refused, naming the holder (`hold`).

        A run that never got as far as writing its config.yaml (a refused start) leaves
        nothing: the lock file and the directory go again if this call created them.
        """
        created = [p for p in (self.path, self.lock_file) if not p.exists()]
        self.make()
        with hold(self.lock_file, self.path):
            try:
                yield
            finally:
                if not self.config.exists():  # still held: no other process comes between
                    self._remove_if_created(created)

    def _remove_if_created(self, created: list[Path]) -> None:
        """Undo what `lock` made for a run that did not start: only paths it created, and
        the directory only if nothing else was put in it meanwhile."""
        if self.lock_file in created:
            self.lock_file.unlink(missing_ok=True)
        if self.path in created:
            with contextlib.suppress(OSError):  # not empty: someone else's files stay
                self.path.rmdir()

    def make(self) -> None:
        """Create the run directory, or say in one line why it cannot be one."""
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file, not a run directory; choose another --out")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run directory {self.path}: {e.strerror}; "
                              "choose another --out") from None

    def started(self) -> bool:
        """A config and anything a training step leaves: resuming it is then a choice."""
        return self.config.exists() and (self.metrics.exists() or self.checkpoints.exists())

    def finished(self) -> bool:
        return self.eval_report.is_file() and (self.final / CONFIG_FILE).is_file()

    def weights(self) -> Path | None:
        """final/ if written, else the latest checkpoint's weights; None if neither."""
        if (self.final / CONFIG_FILE).is_file():
            return self.final
        return self.latest_checkpoint()

    @classmethod
    def around(cls, weights: str | os.PathLike[str]) -> RunDir | None:
        """The run a path belongs to: the run itself, its final/ or one of its checkpoints."""
        p = Path(weights)
        for candidate in (p, p.parent, p.parent.parent):
            if cls(candidate).config.is_file():
                return cls(candidate)
        return None


def weights_dir(path: str | os.PathLike[str]) -> Path:
    """A weights directory as given, or the weights of the run directory given."""
    p = Path(path)
    if p.is_file():
        raise WeightsError(f"{p} is a file; give a run directory or a weights directory "
                           f"(one holding {CONFIG_FILE} and the weights)")
    if (p / CONFIG_FILE).is_file():
        return p
    return RunDir(p).weights() or p  # load_model then reports what is missing


def export_dir(weights: str | os.PathLike[str]) -> Path:
    """Where the graphs exported from a weights directory go."""
    return Path(weights) / _EXPORT


def eval_report_path(weights: str | os.PathLike[str], split: str, tta: str,
                     backend: str = "torch", precision: str = "fp32",
                     recompute_bn: bool = False, dataset: str | None = None) -> Path:
    """Where `resnetlab eval` reports on a weights directory by default: one file per split,
    views, BN statistics, data set named, backend and precision, so that scoring another
    way never overwrites a report. The reference, PyTorch fp32 on the run's own data with
    its own statistics (the defaults), keeps the plain eval-<split>-<tta>.json."""
    scored_by = "" if (backend, precision) == ("torch", "fp32") else f"-{backend}-{precision}"
    how = ("-recomputed-bn" if recompute_bn else "") + (f"-on-{dataset}" if dataset else "")
    return Path(weights) / f"eval-{split}-{tta}{how}{scored_by}.json"


def changed_images(run: RunDir, images: TrainImages | None) -> str | None:
    """How the image folder's training files differ from those `run` started on (its
    data.json), or None: the same, not a folder run, or a run older than that file."""
    if images is None or not run.data.is_file():
        return None
    try:
        then = json.loads(run.data.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(then, dict) or "train_digest" not in then \
            or then["train_digest"] == images.digest:
        return None
    before = then.get("train_files")
    if before == images.files:
        return f"{images.files:,} image files then and now, but not the same ones"
    return f"{before:,} image files then, {images.files:,} now" if isinstance(before, int) \
        else f"{images.files:,} image files now, not the ones it started on"


def run_config(weights: str | os.PathLike[str], dataset: str | None = None,
               data_dir: str | None = None, sets: Sequence[str] = ()) -> TrainConfig:
    """The config of the run the weights belong to, or one for `dataset` if given; then
    `data_dir` and the --set pairs `sets` (e.g. data.max_bad_fraction=0.05) on top."""
    given = [{"data": {k: v for k, v in (("dataset", dataset), ("data_dir", data_dir)) if v}}]
    if dataset:
        return resolve(None, None, sets, settings=given)
    run = RunDir.around(weights)
    if run is None:
        raise ConfigError(f"{weights} is not inside a run directory: say which data set "
                          "with --data (fashion-mnist, mnist, cifar10, cifar100, folder)")
    # The run's own file first, then what this call changes of it.
    return resolve(None, None, sets, settings=[load_yaml(run.config), *given])


def run_data(weights: str | os.PathLike[str], batch_size: int = 500,
             dataset: str | None = None, data_dir: str | None = None,
             strict: bool = False, sets: Sequence[str] = (), views: str = "center"
             ) -> DataBundle:
    """The run's data, normalised with the statistics saved beside the weights; a folder's
    val and test images prepared for the test-time `views` (build_data)."""
    cfg = run_config(weights, dataset, data_dir, sets)
    mc = ModelConfig.from_json(weights_dir(weights) / CONFIG_FILE)
    try:
        data = build_data(cfg.data, cfg.batch_size, batch_size, cfg.seed,
                          stats=(mc.mean, mc.std), strict=strict, views=views)
    except DataError as e:
        if dataset or data_dir:
            raise
        raise DataError(f"{e} (the data the run was trained on; where it is now: --data-dir)"
                        ) from None
    # The run's own data must have its classes; another data set (--data: imported weights
    # on ImageNet's folders, whose names are WordNet ids) as many.
    names = mc.class_names
    if names is not None and (list(names) != list(data.classes) if dataset is None
                              else len(names) != len(data.classes)):
        raise ConfigError(_other_classes(names, data.classes, cfg.data.data_dir))
    return data


def check_held_out(weights: str | os.PathLike[str], data: DataBundle, split: str) -> None:
    """Refuse to score `split` of a folder run where it is held out of training images
    that changed since the run trained: each class's shuffle, hence the held-out images,
    would be drawn anew, and images it trained on could be scored."""
    run = RunDir.around(weights)
    images = data.train_images
    if run is None or images is None or split not in images.held_out:
        return
    why = changed_images(run, images)
    if why:
        raise ConfigError(f"the training images changed since {run.path} was trained "
                          f"({why}): its held-out {split} images would be drawn anew, and "
                          "could be ones it trained on; restore the folder, or score a folder "
                          "with its own val/ or test/ (--data-dir)")


def _other_classes(trained: list[str], found: list[str], where: str | None) -> str:
    """Why the data's classes cannot be scored by a model trained on `trained`."""
    added = [c for c in found if c not in trained]
    gone = [c for c in trained if c not in found]
    what = "; ".join(part for part in (f"new: {', '.join(added)}" if added else "",
                                       f"gone: {', '.join(gone)}" if gone else "") if part) \
        or "the same names in another order"
    return (f"the data{f' in {where}' if where else ''} has other classes than the model was "
            f"trained on ({what}), so its labels would be scored against the wrong outputs: "
            "restore the folder as it was, or give one with the model's classes as "
            "--data-dir")
