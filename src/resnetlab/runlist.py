"""Every run under a folder, one row each: what it trains, how far it got, how well it did.

Read-only by design: listing runs never writes, truncates or deletes a file, and one run
whose files cannot be read still gets its row (status "unreadable", its unknown fields "?"),
so a bad run never hides the others.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import load_yaml
from .errors import ConfigError
from .runs import _HELD, RunDir

log = logging.getLogger(__name__)

STATUSES = ("finished", "running", "stopped", "not started", "unreadable")
# A run's own folders: never runs themselves, and final/export can be large
_OWN_DIRS = frozenset({"checkpoints", "final", "tensorboard"})
# The files each numeric field of a row is read from
_SOURCES = {"done": {"metrics.jsonl", "eval.json"}, "planned": {"config.yaml"},
            "best_val_error": {"metrics.jsonl"}, "test_error": {"eval.json"},
            "seconds": {"metrics.jsonl", "eval.json"}}


@dataclass(frozen=True)
class RunRow:
    """One run as its files describe it; None: not there (yet)."""

    path: Path
    model: str
    data: str  # the data set, and for image folders the folder's name: "folder:flowers"
    precision: str  # what the run trains in ("-" if not known)
    done: int | None  # iterations done
    planned: int | None  # schedule.iterations
    best_val_error: float | None
    test_error: float | None
    seconds: float | None  # training time
    status: str  # one of STATUSES
    unknown: frozenset[str] = frozenset()  # fields whose file could not be read: shown "?"
    problem: str = ""  # why the run is unreadable, in one line


class _Unreadable(Exception):
    """A file of the run that exists but cannot be read."""


def find_runs(root: Path) -> list[RunDir]:
    """The run directories (folders holding a config.yaml) at any depth below `root`, and
    `root` itself if it is one, sorted by path. Symlinked and unreadable folders are passed
    over rather than followed or raised."""
    found = []
    for here, dirs, _files in os.walk(root):
        path = Path(here)
        if RunDir(path).config.is_file():
            found.append(RunDir(path))
            dirs[:] = [d for d in dirs if d not in _OWN_DIRS]
        dirs.sort()
    return sorted(found, key=lambda r: r.path)


def summarise(run: RunDir) -> RunRow:
    """The row of one run; never raises for a run whose files are missing or broken."""
    problems: dict[str, str] = {}  # file name -> why it cannot be read

    def read(name: str, reader: Callable[[], Any], default: Any) -> Any:
        try:
            return reader()
        except _Unreadable as e:
            problems[name] = str(e)
            return default

    cfg = read("config.yaml", lambda: _config(run), None)
    choices = read("choices.json", lambda: _json_object(run.choices), None)
    report = read("eval.json", lambda: _json_object(run.eval_report), {})
    m = read("metrics.jsonl", lambda: _Metrics.read(run.metrics), _Metrics())
    seconds = _number(report.get("train_seconds"))
    row = RunRow(
        path=run.path,
        model=_model(cfg),
        data=_data(cfg),
        precision=_precision(cfg, choices),
        done=m.last_iteration if m.last_iteration is not None else _int(report.get("iterations")),
        planned=_pick(cfg, "schedule.iterations", int, None),
        best_val_error=m.best_val_error,
        test_error=_number(report.get("top1_error")),
        seconds=seconds if seconds is not None else m.last_elapsed_s,
        status="unreadable" if problems else _status(run),
        problem="; ".join(problems.values()),
    )
    # A field is unknown ("?"), not absent ("-"), when a file it comes from could not be read
    unknown = {name for name, files in _SOURCES.items()
               if getattr(row, name) is None and files & problems.keys()}
    return replace(row, unknown=frozenset(unknown))


# ------------------------------------------------------------------------- reading files

def _config(run: RunDir) -> dict[str, Any]:
    try:
        return load_yaml(run.config)
    except ConfigError as e:  # already one line, naming the file and what is wrong
        raise _Unreadable(str(e)) from None


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} if there is no such file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise _Unreadable(f"{path.name} cannot be read: {_reason(e)}") from None
    try:
        data = json.loads(text)
    except ValueError as e:  # UnicodeDecodeError among them
        raise _Unreadable(f"{path.name} is not JSON ({_reason(e)})") from None
    if not isinstance(data, dict):
        raise _Unreadable(f"{path.name} does not hold a JSON object")
    return data


@dataclass
class _Metrics:
    """What the table needs of metrics.jsonl, read a line at a time (it can be long)."""

    last_iteration: int | None = None
    best_val_error: float | None = None
    last_elapsed_s: float | None = None

    @classmethod
    def read(cls, path: Path) -> _Metrics:
        m = cls()
        try:
            with path.open(encoding="utf-8") as f:
                for number, record in _records(f):
                    m._add(number, record)
        except FileNotFoundError:
            pass
        except UnicodeDecodeError:
            raise _Unreadable("metrics.jsonl is not UTF-8 text") from None
        except OSError as e:
            raise _Unreadable(f"metrics.jsonl cannot be read: {_reason(e)}") from None
        return m

    def _add(self, number: int, record: dict[str, Any]) -> None:
        iteration = _int(record.get("iteration"))
        if iteration is None:
            raise _Unreadable(f"metrics.jsonl line {number} has no iteration")
        self.last_iteration = iteration
        if record.get("kind") != "eval":
            return
        val = _number(record.get("val_error"))
        if val is not None:
            self.best_val_error = val if self.best_val_error is None \
                else min(self.best_val_error, val)
        self.last_elapsed_s = _number(record.get("elapsed_s"))


def _records(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) of each non-blank line. An unterminated last line that is not
    JSON is a write a kill cut short (the resume drops it too), not a broken file."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if not line.endswith("\n"):
                return
            raise _Unreadable(f"metrics.jsonl line {number} is not JSON") from None
        if not isinstance(record, dict):
            raise _Unreadable(f"metrics.jsonl line {number} is not a JSON object")
        yield number, record


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())


# ------------------------------------------------------------------------ reading fields

def _pick(tree: dict[str, Any] | None, dotted: str, kind: type, default: Any) -> Any:
    """tree["a"]["b"] for "a.b" if it is a `kind` (bool is no int here), else `default`."""
    node: Any = tree
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    ok = isinstance(node, kind) and not (kind is int and isinstance(node, bool))
    return node if ok else default


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if ok else None


def _model(cfg: dict[str, Any] | None) -> str:
    """The registered name and the options that change it: `resnet56 (plain=true)` is
    reproduce's plain twin, not a ResNet-56."""
    name = _pick(cfg, "model.name", str, "?")
    options = _pick(cfg, "model.options", dict, {})
    shown = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                      for k, v in options.items())
    return f"{name} ({shown})" if shown else name


def _data(cfg: dict[str, Any] | None) -> str:
    dataset = _pick(cfg, "data.dataset", str, "?")
    folder = _pick(cfg, "data.data_dir", str, "")
    if dataset == "folder" and Path(folder).name:
        return f"folder:{Path(folder).name}"
    return str(dataset)


def _precision(cfg: dict[str, Any] | None, choices: dict[str, Any] | None) -> str:
    """What the run trains in: choices.json (None: unreadable) records what `auto` became;
    runs from before it have only config.yaml's setting."""
    if choices is None:
        return "?"
    chosen = choices.get("precision")
    if isinstance(chosen, str):
        return chosen
    return str(_pick(cfg, "precision", str, "-" if cfg is not None else "?"))


# ------------------------------------------------------------------------------- status

def _status(run: RunDir) -> str:
    if run.finished():
        return "finished"
    if _running(run):
        return "running"
    if run.metrics.exists() or run.checkpoints.exists():
        return "stopped"
    return "not started"


def _running(run: RunDir) -> bool:
    """Whether a process holds the run's lock (RunDir.lock). Probed with a shared lock on a
    read-only descriptor of our own, released at once: it conflicts with the trainer's
    exclusive lock, needs no write access to another user's run, and changes no byte."""
    with contextlib.suppress(OSError):
        if run.lock_file.resolve() in _HELD:
            # This process holds it; closing any descriptor of the file here would drop
            # that lock (POSIX record locks), so it is not opened at all.
            return True
    try:
        fd = os.open(run.lock_file, os.O_RDONLY)
    except OSError:  # no lock file: nobody ever held it, or the refused start removed it
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return True
        log.debug("cannot probe the lock of %s: %s", run.path, e)
        return False
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
