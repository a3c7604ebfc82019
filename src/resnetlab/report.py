"""What a run leaves behind for people: metric records, a CSV summary, paper-style figures."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .errors import ConfigError
from .files import write_text_atomic
from .runs import RunDir

log = logging.getLogger(__name__)

SUMMARY_FIELDS = ["iteration", "epoch", "train_loss", "train_error", "val_error", "test_error",
                  "lr", "images_per_s", "elapsed_s"]
# TensorBoard tag of each record field, by record kind (log.tensorboard=true)
SCALARS = {
    "train": {"loss": "train/loss", "train_error": "train/error", "lr": "train/lr",
              "images_per_s": "train/images_per_s"},
    "eval": {"val_error": "eval/val_error", "test_error": "eval/test_error"},
}


class MetricsLog:
    """Appends one JSON object per line; on resume, lines past the checkpoint are dropped.

    With `tensorboard`, each record written is also a set of TensorBoard scalars under
    RUN/tensorboard/ (SCALARS names them), at global step = its iteration.
    """

    def __init__(self, run: RunDir, tensorboard: bool = False) -> None:
        self.path, self.csv_path, self.tb_dir = run.metrics, run.summary, run.tensorboard
        self._writer: Any = None  # a SummaryWriter, opened at the first write
        self._purge_step: int | None = None
        self._writer_class: Any = _summary_writer() if tensorboard else None

    def truncate_after(self, iteration: int) -> None:
        """Forget records of iterations a resumed run will redo (each file whole or not at
        all: a kill during the rewrite leaves the old one)."""
        for path, keep in ((self.path, self._keep_json), (self.csv_path, self._keep_csv)):
            if path.exists():
                lines = path.read_text().splitlines(keepends=True)
                kept = "".join(ln for i, ln in enumerate(lines) if keep(i, ln, iteration))
                write_text_atomic(path, kept)
        if self._writer_class is not None:
            # Event files are append-only: the next writer opens with a purge mark, which
            # makes readers drop every earlier event at this step or later.
            self.close()
            self._purge_step = iteration + 1

    @staticmethod
    def _keep_json(_: int, line: str, iteration: int) -> bool:
        try:
            return int(json.loads(line)["iteration"]) <= iteration
        except (ValueError, KeyError, TypeError):
            return False

    @staticmethod
    def _keep_csv(index: int, line: str, iteration: int) -> bool:
        return index == 0 or int(line.split(",", 1)[0]) <= iteration

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if record.get("kind") == "eval":
            new = not self.csv_path.exists()
            with self.csv_path.open("a", newline="") as f:
                w = csv.DictWriter(f, SUMMARY_FIELDS, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(record)
        if self._writer_class is not None:
            self._write_scalars(record)

    def _write_scalars(self, record: dict[str, Any]) -> None:
        tags = SCALARS.get(record.get("kind", ""), {})
        values = {tag: record[key] for key, tag in tags.items() if record.get(key) is not None}
        if not values:
            return
        if self._writer is None:
            self._writer = self._writer_class(str(self.tb_dir), purge_step=self._purge_step)
            self._purge_step = None
            log.info("TensorBoard scalars go to %s (tensorboard --logdir %s)", self.tb_dir,
                     self.tb_dir)
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=int(record["iteration"]))
        self._writer.flush()  # a killed run keeps the scalars it logged

    def close(self) -> None:
        """Close the TensorBoard writer, if one is open; writing again opens another."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def evaluations(self) -> list[int]:
        """The iterations of the evaluations recorded (a line torn by a kill skipped)."""
        found = []
        for ln in self.path.read_text().splitlines() if self.path.exists() else []:
            try:
                rec = json.loads(ln)
                if rec.get("kind") == "eval":
                    found.append(int(rec["iteration"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
        return found

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def _summary_writer() -> Any:
    """torch's SummaryWriter class, or a one-line error if tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("log.tensorboard=true needs the tensorboard package: "
                          "pip install tensorboard") from None
    return SummaryWriter


def plot_curves(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Error (%) against iterations, paper Fig. 1/6 style: thin = train, bold = test."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    if train:
        ax.plot([r["iteration"] for r in train], [100 * r["train_error"] for r in train],
                lw=0.8, color="C0", label="train")
    styles: dict[str, dict[str, Any]] = {
        "val_error": dict(lw=1.5, ls="--", color="C1", label="val"),
        "test_error": dict(lw=2.4, color="C0", label="test")}
    for key, style in styles.items():
        pts = [(r["iteration"], 100 * r[key]) for r in evals if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, **style)
    ax.set_xlabel("iteration")
    ax.set_ylabel("error (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_confusion(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                   title: str = "") -> Path:
    """Row-normalised confusion matrix with counts, true class on the rows."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n), dpi=120)
    rows = [max(1, sum(r)) for r in confusion]
    norm = [[c / t for c in r] for r, t in zip(confusion, rows, strict=True)]
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if norm[i][j] > 0.5 else "black")
        ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
