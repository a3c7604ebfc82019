"""What a run leaves behind for people: metric records, a CSV summary, paper-style figures."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from .runs import RunDir

SUMMARY_FIELDS = ["iteration", "epoch", "train_loss", "train_error", "val_error", "test_error",
                  "lr", "images_per_s", "elapsed_s"]


class MetricsLog:
    """Appends one JSON object per line; on resume, lines past the checkpoint are dropped."""

    def __init__(self, run: RunDir) -> None:
        self.path, self.csv_path = run.metrics, run.summary

    def truncate_after(self, iteration: int) -> None:
        """Forget records of iterations a resumed run will redo."""
        for path, keep in ((self.path, self._keep_json), (self.csv_path, self._keep_csv)):
            if path.exists():
                lines = path.read_text().splitlines(keepends=True)
                path.write_text("".join(ln for i, ln in enumerate(lines) if keep(i, ln, iteration)))

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

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


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
