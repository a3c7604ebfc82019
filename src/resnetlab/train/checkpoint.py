"""Checkpoints that a kill cannot destroy.

Each checkpoint is a new directory (RunDir.checkpoint) holding the weights (the format of
`save_weights`) and the trainer state (optimizer, schedule, position, RNG; tensors and
plain values only, read back with `torch.load(weights_only=True)`). Only once every file is
on disk does the small pointer file (RunDir.pointer) switch to it (temporary file, fsync,
rename), so whatever moment a process dies, the pointer names a complete checkpoint. Older
ones are then removed, unless they hold files saving did not write: `resnetlab eval` and
`export` of an unfinished run put their reports and graphs beside its latest weights
(runs.py), and those are the user's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ResNetLabError
from ..files import write_atomic
from ..models.config import CONFIG_FILE, WEIGHTS_FILE
from ..models.factory import load_weights, save_weights
from ..runs import STATE_FILE, RunDir

log = logging.getLogger(__name__)

FILES = (WEIGHTS_FILE, CONFIG_FILE, STATE_FILE)  # what a checkpoint is
_told: set[Path] = set()  # checkpoints kept for others' files, said once per process


class CheckpointError(ResNetLabError):
    """A checkpoint that cannot be written or read."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run: RunDir, model: nn.Module, state: dict[str, Any],
                    class_names: list[str] | None, data_config: dict[str, Any],
                    keep: int = 1) -> Path:
    """Write a complete checkpoint, then point `latest` at it, then prune older ones (`keep`
    counts this one)."""
    root = run.checkpoints
    root.mkdir(parents=True, exist_ok=True)
    target = run.checkpoint(int(state["iteration"]))
    tmp = root / f".tmp-{target.name}"
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_weights(model, tmp, class_names=class_names, **data_config)
        write_atomic(tmp / STATE_FILE, lambda p: torch.save(state, p))
        _fsync_dir(tmp)
        if target.exists():  # this step saved before (a resume from an older checkpoint)
            # Set aside where no sweep of temporaries reaches it if it holds others' files.
            aside = run.replaced(target) if _others(target) else root / f".tmp-old-{target.name}"
            if aside.exists():  # a save killed here before left only the trainer's files
                shutil.rmtree(aside)
            os.replace(target, aside)
            if aside.name.startswith("replaced-"):
                log.warning("kept %s: the earlier %s, with files saving did not write",
                            aside, target.name)
        os.replace(tmp, target)
        write_atomic(run.pointer, lambda p: Path(p).write_text(target.name + "\n"))
        _fsync_dir(root)
    except OSError as e:
        raise CheckpointError(f"cannot write a checkpoint in {root}: {e.strerror or e}; "
                              "the previous checkpoint is kept") from None
    # Only checkpoints older than this one are superseded; a newer one (this run resumed
    # from an older checkpoint) is someone's work, and stays.
    older = [d for d in run.checkpoint_dirs() if d.name < target.name]
    for old in older[:max(0, len(older) - (keep - 1))]:
        if others := _others(old):
            if old not in _told:
                _told.add(old)
                log.warning("kept %s: it holds %s, which training did not write (remove it "
                            "once done with them)", old, ", ".join(others))
            continue
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # what a save killed midway left behind
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{run.pointer.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    return target


def _others(ckpt: Path) -> list[str]:
    """What a checkpoint directory holds besides the checkpoint: an eval report, an export;
    not an empty folder (nothing if another process removed the directory meanwhile)."""
    try:
        return sorted(p.name for p in ckpt.iterdir() if p.name not in FILES
                      and not (p.is_dir() and not any(p.iterdir())))
    except FileNotFoundError:
        return []


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load the weights into `model` and return the trainer state (no pickle code runs)."""
    load_weights(model, path)
    try:
        return torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    except Exception as e:  # a crafted or damaged file: refuse it, never execute it
        raise CheckpointError(f"{path / STATE_FILE} cannot be loaded safely: "
                              f"{str(e).splitlines()[0]}") from None
