"""`resnetlab eval` as a library call: a run or weights directory scored on its own data.

The data set, split and normalisation come from the run the weights belong to (its
config.yaml) unless a data set is named; the model runs on any backend and precision
(deploy/backends.py), a reduced precision only after its agreement check.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..data.config import DataConfig
from ..data.memory import Normalize
from ..deploy.agreement import MIN_AGREEMENT, Agreement
from ..deploy.backends import ImageSource, canonical, load_backend
from ..errors import ConfigError
from ..models.config import CONFIG_FILE, ModelConfig
from ..models.factory import load_model
from ..report import plot_confusion
from ..runs import check_held_out, eval_report_path, run_config, run_data, weights_dir
from .evaluate import EvalResult, PadCrop, evaluate, recompute_bn


def test_images(weights: str | os.PathLike[str]) -> ImageSource | None:
    """The test images of the run the weights belong to (the set reduced precisions are
    checked on), read only when called; None outside a run."""
    try:
        run_config(weights)
    except ConfigError:
        return None

    def images() -> Iterable[torch.Tensor]:
        return (x for x, _ in run_data(weights).test.batches(0))

    return images


def _pad_crop(data: DataConfig, mc: ModelConfig) -> PadCrop | None:
    """The crops training took of in-memory images (10-crop takes the same: with no padding,
    the image and its mirror); None for folders, whose views are cut from the whole image
    (data.folder.view_transform)."""
    if data.dataset == "folder":
        return None
    norm = Normalize(mc.mean, mc.std)
    return PadCrop(data.pad, norm.mean, norm.std)


def _replaceable(out: Path, wdir: Path) -> None:
    """--out may name an earlier report of `resnetlab eval` on these weights (scoring them
    again), or a new file; anything else there (the trainer's eval.json, with its training
    time; someone's file; a figure beside the report's .png) is refused before scoring."""
    ours = False
    if out.exists():
        try:
            said = json.loads(out.read_text()).get("weights")  # resolved (older: as given)
            ours = said in (str(wdir), str(wdir.resolve()))
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"{out} exists and is not a report of `resnetlab eval` on "
                              f"{wdir}; choose another --out, or move it away")
    png = out.with_suffix(".png")
    if png.exists() and not ours:
        raise ConfigError(f"{png} exists (the report's confusion matrix would replace it); "
                          "choose another --out, or move it away")


@dataclass
class RunEval:
    """What `evaluate_run` measured and where it wrote it."""

    result: EvalResult
    config: ModelConfig
    classes: list[str]
    backend: str
    precision: str
    agreement: Agreement | None  # the reduced precision's check on these very images
    seconds: float
    report: Path
    confusion: Path
    skipped: int = 0  # unreadable files the loader left out of the scoring


def evaluate_run(weights: str | os.PathLike[str], split: str = "test", tta: str = "center",
                 backend: str = "auto", precision: str = "auto",
                 min_agreement: float = MIN_AGREEMENT, recompute: bool = False,
                 batch_size: int = 500, strict: bool = False, dataset: str | None = None,
                 data_dir: str | None = None, out: str | os.PathLike[str] | None = None,
                 progress: bool | None = None, sets: Sequence[str] = ()) -> RunEval:
    """Score the weights of a run (or a weights directory) on `split` with test-time views
    `tta`; `recompute`: re-estimate BN statistics on training images first (PyTorch, fp32).
    Writes the report (default: beside the weights, named by split, views, backend and
    precision) and its confusion matrix. `progress`: a progress bar (default: when stderr is
    a terminal). `sets`: --set pairs on top of the run's config (data.max_bad_fraction=...)."""
    backend, precision = canonical(backend, precision)
    if out:
        _replaceable(Path(out), weights_dir(weights))
    cfg = run_config(weights, dataset, data_dir, sets)
    data = run_data(weights, batch_size, dataset, data_dir, strict, sets, views=tta)
    if dataset is None:  # the run's own data, or its folder moved (--data-dir)
        check_held_out(weights, data, split)
    wdir = weights_dir(weights)
    mc = ModelConfig.from_json(wdir / CONFIG_FILE)
    split_data = data.test if split == "test" else data.val
    if split_data is None:
        raise ConfigError("this run has no validation split (data.val_split=0)")
    checked: Agreement | None = None
    model: nn.Module
    if recompute:  # new BN statistics live in the PyTorch model, not in a graph
        if backend not in ("auto", "torch") or precision not in ("auto", "fp32"):
            raise ConfigError("--recompute-bn needs --backend torch (or auto) in fp32")
        model = load_model(wdir)
        recompute_bn(model, data.train_eval.batches(0))  # un-augmented, as scored
        backend, precision = "torch", "fp32"
    else:
        def check() -> Iterable[torch.Tensor]:
            # A reduced precision is checked on single views of the test images, however
            # this evaluation views them (a folder's 10 crops are one 5-D tensor an image).
            plain = data if tta in ("center", "flip") else run_data(
                weights, batch_size, dataset, data_dir, strict, sets)
            return (x for x, _ in plain.test.batches(0))

        loaded = load_backend(wdir, backend, precision=precision, check=check,
                              min_agreement=min_agreement)
        model, backend, precision = loaded, loaded.name, loaded.precision
        checked = loaded.agreement  # the trade made (checked before use), reported here
    t0 = time.perf_counter()
    batches = tqdm(split_data.batches(0), total=len(split_data), unit="batch", leave=False,
                   desc=f"{split}, tta={tta}",
                   disable=not (sys.stderr.isatty() if progress is None else progress))
    res = evaluate(model, batches, mc.num_classes, tta, pad_crop=_pad_crop(cfg.data, mc))
    seconds = time.perf_counter() - t0
    names = mc.class_names or data.classes
    path = Path(out) if out else eval_report_path(wdir, split, tta, backend, precision,
                                                  recompute, dataset)
    # Files the loader met and could not read are not in `count` (those the folder scan
    # found unreadable were named when the data was built, and are not either).
    skipped = getattr(split_data, "skipped", 0)
    res.save(path, names, weights=str(wdir.resolve()), split=split, tta=tta, recompute_bn=recompute,
             unreadable_skipped=skipped, backend=backend, precision=precision,
             agreement_with_fp32=None if checked is None else checked.agreement,
             seconds=round(seconds, 2))
    png = plot_confusion(res.confusion, names, path.with_suffix(".png"),
                         f"{mc.architecture}, {split}: {100 * res.top1_error:.2f}% error")
    return RunEval(res, mc, names, backend, precision, checked, seconds, path, png, skipped)
