"""`resnetlab train | eval | predict`: thin wrappers that print what the library returns."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import cluster
from ..config import PRESETS, TrainConfig, to_yaml
from ..data.scan import FolderScan
from ..deploy.agreement import MIN_AGREEMENT
from ..deploy.backends import INT8_ALIAS, backend_names, canonical
from ..deploy.predict import Prediction, Predictor
from ..errors import ConfigError
from ..evaluation.evaluate import TTA_MODES
from ..evaluation.run import evaluate_run, test_images
from ..precision import INFER_PRECISIONS
from ..runs import RunDir
from ..tables import format_duration
from ..train.loop import train
from ..train.request import train_config
from .cluster import add_cluster_flags, cluster_from_args

BACKEND_HELP = ("inference runtime; auto: the fastest installed (openvino, onnxruntime, then "
                "torch); the first use of a graph runtime exports the weights once; "
                f"{INT8_ALIAS} is the older spelling of onnxruntime --precision int8")
PRECISION_HELP = ("fp32, bf16 (openvino, torch), int8 (openvino, onnxruntime; after `export "
                  "--format onnx-int8`), or auto: the fastest this CPU runs natively. bf16 and "
                  "int8, asked for or chosen, are used only if their top-1 agrees with fp32 on "
                  ">= --min-agreement of the run's test images (checked once per weights)")


def add_precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=INFER_PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="least top-1 agreement with fp32 on the run's test images for bf16/int8 "
                   "to be used (default %(default)s; `export --format onnx-int8` has its own, "
                   "lower, floor on the calibration images: export --help)")


def positive_int(value: str) -> int:
    """An argparse type: a whole number >= 1 (a count that 0 or less would make meaningless)."""
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give a whole number >= 1")
    return number


def add_train_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    t = sub.add_parser("train", parents=[common],
                       help="train a model: on a folder of your images (resnetlab train DIR), "
                       "or a preset (default fashion-mnist)",
                       description="Train on a folder of images (DIR/train/<class>/ and "
                       "optionally DIR/val/<class>/, or DIR/<class>/) with a recipe sized from "
                       "it, or with a preset; then a YAML config and --set overrides, in that "
                       "order. Every flag is the --set pair it names. Presets: "
                       + ", ".join(PRESETS))
    t.add_argument("data", nargs="?", metavar="DATA_DIR",
                   help="folder of your images (same as --data-dir)")
    t.add_argument("--preset", help="a shipped recipe (default: the folder recipe for an image "
                   "folder, else fashion-mnist; none with --config)")
    t.add_argument("--config", help="YAML file of settings (e.g. a run's config.yaml)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set optim.lr=0.05 (repeatable)")
    t.add_argument("--data-dir", help="--set data.data_dir=DIR: an image folder, or where a "
                   "preset's data set files are")
    t.add_argument("--init", metavar="SOURCE",
                   help="--set finetune.init=SOURCE: start from these weights (a resnetlab "
                   "weights directory or run, a torchvision or timm .pth or .safetensors file, "
                   "a Hugging Face style folder (config.json + model.safetensors)); with an "
                   "image folder, the recipe becomes a fine-tuning one; see also "
                   "finetune.freeze and finetune.backbone_lr")
    t.add_argument("--out", help="run directory (default runs/<preset>-<time>)")
    t.add_argument("--resume", choices=["auto", "no"], default="no",
                   help="auto: continue from the run directory's newest complete checkpoint, "
                   "if any (without --preset or --config: with the run's own config.yaml); a "
                   "finished run is re-reported")
    t.add_argument("--print-config", action="store_true", help="print the resolved config")
    t.add_argument("--nproc", type=positive_int, default=1,
                   help="data-parallel processes on this machine (runs torchrun for you)")
    add_cluster_flags(t, train=True)
    t.set_defaults(func=cmd_train, trains=True)

    e = sub.add_parser("eval", parents=[common],
                       help="top-1/top-5 error of a run or weights directory")
    e.add_argument("weights", help="run directory or weights directory")
    e.add_argument("--data", help="data set, when the weights are not inside a run directory")
    e.add_argument("--data-dir", help="folder holding the data set's files")
    e.add_argument("--split", choices=["test", "val"], default="test",
                   help="the data split to score (val: the held-out training examples)")
    e.add_argument("--tta", choices=TTA_MODES, default="center",
                   help="center view, the image and its mirror (flip), the paper's 10-crop, or "
                        "multi-scale fully-conv")
    e.add_argument("--recompute-bn", action="store_true",
                   help="re-estimate BatchNorm statistics on the un-augmented training "
                        "images first")
    e.add_argument("--batch-size", type=positive_int, default=500,
                   help="images per forward pass")
    e.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="change one setting of the run's config for this evaluation, e.g. "
                   "--set data.max_bad_fraction=0.05 (repeatable)")
    e.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image file (folder data sets)")
    e.add_argument("--out", help="JSON file for the results (default: next to the weights); "
                   "replaces only an earlier eval report of the same weights")
    e.add_argument("--backend", choices=backend_names(), default="auto", help=BACKEND_HELP)
    add_precision_args(e)
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", parents=[common], help="classify image files")
    p.add_argument("weights", help="run directory or weights directory")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WebP, BMP, ...)")
    p.add_argument("--topk", type=positive_int, default=5, help="classes shown per image")
    p.add_argument("--json", action="store_true", help="one JSON object per image")
    p.add_argument("--backend", choices=backend_names(), default="auto", help=BACKEND_HELP)
    add_precision_args(p)
    p.set_defaults(func=cmd_predict)


def _torchrun(cfg: TrainConfig, nproc: int, out: Path, resume: str) -> int:
    """`--nproc N`: train `cfg` under torchrun with N local processes. The ranks read the
    resolved configuration from a file, so every flag and --set reaches them as resolved
    here (re-typing flags once lost --init: each rank trained from scratch)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env and not cfg.threads:
        # torchrun would set 1: N CPU ranks on N of the machine's cores, the rest idle.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    with tempfile.TemporaryDirectory(prefix="resnetlab-nproc-") as tmp:
        resolved = Path(tmp) / "config.yaml"
        resolved.write_text(to_yaml(cfg))
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={nproc}", "-m", "resnetlab", "train", "--config",
                str(resolved), "--out", str(out), "--resume", resume]
        proc = subprocess.Popen(argv, env=env)
        # `kill PID` reaches this process only: torchrun hears it too, stops its ranks and
        # ends, instead of training on as an orphan that holds the run's lock.
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        try:
            return proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _own_config(args: argparse.Namespace) -> str | None:
    """`--out RUN --resume auto` without --preset or --config: the run's own config.yaml
    (which --set may change, and the run's check then names what changed)."""
    if args.resume == "auto" and args.out and not (args.preset or args.config):
        saved = RunDir(args.out).config
        return str(saved) if saved.exists() else None
    return None


def _as_set(key: str, value: str) -> str:
    """A flag's value as a --set pair; JSON quoting keeps a path a string in YAML."""
    return f"{key}={json.dumps(value)}"


def train_sets(args: argparse.Namespace) -> list[str]:
    """Every `train` flag that names a setting, as its --set pair, before the user's own
    --set pairs (which come later, so they win)."""
    if args.data and args.data_dir and args.data != args.data_dir:
        raise ConfigError(f"two data directories: {args.data} and --data-dir {args.data_dir}; "
                          "give one")
    data_dir = args.data or args.data_dir
    # Absolute in the saved config: eval, predict and resume find it from any directory.
    flags = {"data.data_dir": os.path.abspath(data_dir) if data_dir else None,
             "finetune.init": args.init}
    return [*(_as_set(k, v) for k, v in flags.items() if v), *args.sets]


def _recipe_block(cfg: TrainConfig, scan: FolderScan) -> str:
    """The folder recipe as chosen, in a few lines: what was found, what will be done."""
    d, s = cfg.data, cfg.schedule
    held = f"{d.val_split:,} training images held out, every class" if d.val_split else None
    val = held or (f"val/ ({sum(scan.val_counts.values()):,} images)" if scan.val else "none")
    test = "test/" if scan.test else "val/" if scan.val else \
        "the held-out images" if held else "none"
    start = f"from {cfg.finetune.init} (fine-tuning)" if cfg.finetune.init else "from scratch"
    steps = max((scan.n_train - d.val_split) // cfg.batch_size, 1)
    length = f"{s.epochs} epochs of {steps} batches of {cfg.batch_size}" if s.epochs else \
        f"{s.iterations:,} iterations of batch {cfg.batch_size}"
    return "\n".join([
        f"{scan.root}: {len(scan.classes)} classes ({', '.join(scan.classes[:6])}"
        f"{', ...' if len(scan.classes) > 6 else ''}), {scan.n_train:,} training images "
        f"of about {scan.image_size} px",
        "recipe (change any part with --set KEY=VALUE; --print-config shows all):",
        f"  {cfg.model.name} at {d.image_size} px, {start}",
        f"  {length}, {s.kind} lr {cfg.optim.lr:g} after {s.warmup_iters} warm-up iterations",
        f"  validation: {val}; test: {test}; precision {cfg.precision}"])


def cmd_train(args: argparse.Namespace) -> int:
    own = _own_config(args)
    cfg, scan = train_config(args.preset, own or args.config, train_sets(args))
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    out = Path(args.out) if args.out else \
        Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cc = cluster_from_args(args)
    if cc is not None and args.nproc > 1:
        raise ConfigError("--nproc starts torchrun here; with --executor give --nodes and "
                          "--gpus-per-node instead")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(cfg, args.nproc, out, args.resume)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        if scan is not None:
            print(_recipe_block(cfg, scan), flush=True)
        recipe = "its own config.yaml" if own else "the folder recipe above" \
            if cfg.preset == "folder" else "the config given" if cfg.preset == "custom" \
            else f"the {cfg.preset} preset"
        length = f"{cfg.schedule.epochs} epochs" if cfg.schedule.epochs else \
            f"{cfg.schedule.iterations:,} iterations"
        print(f"training {cfg.model.name} on {cfg.data.dataset} ({length}) into {out} with "
              f"{recipe}", flush=True)
    res = cluster.train_job(cc, cfg, out, args.resume == "auto", say=print) if cc else \
        train(cfg, out, resume=args.resume == "auto")
    if not main_rank:
        return 0
    acc = 100 * (1 - res.test.top1_error)
    if res.already_finished:
        print(f"{out} had finished; nothing trained, its results:")
    print(f"test accuracy {acc:.2f}% (top-1 error {100 * res.test.top1_error:.2f}%, "
          f"top-5 error {100 * res.test.top5_error:.2f}%) on {res.test.count:,} test images")
    took = "" if res.seconds is None else f" in {format_duration(res.seconds)}"
    print(f"trained {res.iterations} iterations{took}")
    print(f"run directory: {res.run_dir}")
    print(f"weights:       {res.weights}")
    print(f"curves:        {res.curves}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    ev = evaluate_run(args.weights, split=args.split, tta=args.tta, backend=args.backend,
                      precision=args.precision, min_agreement=args.min_agreement,
                      recompute=args.recompute_bn, batch_size=args.batch_size,
                      strict=args.strict, dataset=args.data, data_dir=args.data_dir,
                      out=args.out, sets=args.sets)
    res = ev.result
    print(f"{ev.config.architecture} on the {args.split} split ({res.count:,} images, "
          f"tta={args.tta}, backend {ev.backend} {ev.precision}"
          f"{', BN recomputed' if args.recompute_bn else ''}): {ev.seconds:.1f} s, "
          f"{res.count / ev.seconds:,.0f} images/s")
    print(f"top-1 error {100 * res.top1_error:.2f}%   top-5 error {100 * res.top5_error:.2f}%"
          f"   accuracy {100 * (1 - res.top1_error):.2f}%")
    if ev.agreement is not None:  # a failing check refuses the precision before scoring
        print(ev.agreement.line())
    width = max(len(n) for n in ev.classes)
    for name, acc in zip(ev.classes, res.per_class_accuracy, strict=True):
        print(f"  {name:<{width}}  " + ("  —  (no images)" if acc is None else
                                        f"{100 * acc:6.2f}%"))
    if ev.skipped:
        print(f"  {ev.skipped} unreadable image file{'s' if ev.skipped > 1 else ''} left out "
              f"of the {res.count:,} scored (the log above names them)")
    print(f"results: {ev.report}\nconfusion matrix: {ev.confusion}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    # One spelling from here on (the int8 alias is onnxruntime at int8), and a reduced
    # precision, asked for or chosen by auto, is checked on the run's test images first.
    backend, precision = canonical(args.backend, args.precision)
    check = test_images(args.weights) if precision != "fp32" else None
    predictor = Predictor(args.weights, backend, precision, check, args.min_agreement)
    failed = 0
    for res in predictor.predict(args.images, args.topk):
        if not isinstance(res, Prediction):
            print(f"error: {res}", file=sys.stderr)
            failed += 1
        elif args.json:
            print(json.dumps({"path": res.path, "predictions": [
                {"label": lab, "index": i, "prob": round(p, 6)}
                for lab, i, p in zip(res.labels, res.indices, res.probs, strict=True)]}))
        else:
            best = ", ".join(f"{lab} {100 * p:.1f}%" for lab, p in
                             zip(res.labels, res.probs, strict=True))
            print(f"{res.path}: {best}")
    return 1 if failed else 0

