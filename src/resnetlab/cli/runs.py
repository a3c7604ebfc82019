"""`resnetlab runs [DIR]`: every run below a folder, one line each."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..runlist import RunRow, find_runs, summarise
from ..tables import format_duration, format_table

HEADERS = ["run", "model", "data", "precision", "iterations", "best val", "test error", "time",
           "status"]
_NUMERIC = {"iterations", "best val", "test error", "time"}  # right-aligned
_LAST = float("inf")  # runs without the value sort after those with it
SORTS: dict[str, Callable[[RunRow], Any]] = {
    "path": lambda r: r.path,
    "test": lambda r: _LAST if r.test_error is None else r.test_error,
    "val": lambda r: _LAST if r.best_val_error is None else r.best_val_error,
}


def _field(row: RunRow, name: str, show: Callable[[Any], str]) -> str:
    """A numeric field as text: "?" if its file could not be read, "-" if not there."""
    if name in row.unknown:
        return "?"
    value = getattr(row, name)
    return "-" if value is None else show(value)


def _percent(error: float) -> str:
    return f"{100 * error:.2f}%"


def _cells(row: RunRow, root: Path) -> list[str]:
    return [row.path.relative_to(root).as_posix(), row.model, row.data, row.precision,
            f"{_field(row, 'done', str)}/{_field(row, 'planned', str)}",
            _field(row, "best_val_error", _percent), _field(row, "test_error", _percent),
            _field(row, "seconds", format_duration), row.status]


def _align_right(table: list[list[str]], columns: set[str]) -> None:
    """Pad the numeric columns (header row first) on the left, as format_table does only
    for int and float cells, so that their digits line up."""
    for i, name in enumerate(table[0]):
        if name in columns:
            width = max(len(r[i]) for r in table)
            for r in table:
                r[i] = r[i].rjust(width)


def cmd_runs(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if not root.is_dir():
        print(f"{root} is not a folder; give the one your runs are in: resnetlab runs DIR",
              file=sys.stderr)
        return 2
    rows = sorted((summarise(r) for r in find_runs(root)), key=SORTS[args.sort])
    if not rows:
        print(f"no runs under {root} (a run is a folder holding a config.yaml)")
        return 0
    table = [list(HEADERS), *(_cells(r, root) for r in rows)]
    _align_right(table, _NUMERIC)
    print(format_table(table[0], table[1:]))
    for r in rows:
        if r.problem:
            print(f"{r.path.relative_to(root).as_posix()}: {r.problem}")
    return 0


def add_runs_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("runs", parents=[common],
                       help="table of the runs below a folder: model, data, progress, errors, "
                       "status")
    r.add_argument("dir", nargs="?", default="runs",
                   help="folder to search at any depth (default: runs)")
    r.add_argument("--sort", choices=list(SORTS), default="path",
                   help="order of the rows: path (default), test (test error) or val (best "
                   "validation error), lowest first")
    r.set_defaults(func=cmd_runs)
