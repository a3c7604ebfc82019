"""`resnetlab export` and `resnetlab bench`: thin wrappers over deploy/ and benchmarks/."""

from __future__ import annotations

import argparse

from ..benchmarks import BENCHMARKS, run_benchmark
from ..deploy.agreement import MIN_AGREEMENT, MIN_CALIBRATION_AGREEMENT
from ..deploy.export import TOLERANCE, export
from ..deploy.quantize import quantize_run
from ..deploy.runtimes import formats
from ..runs import weights_dir


def add_deploy_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    x = sub.add_parser("export", parents=[common],
                       help="write ONNX / OpenVINO / TorchScript, checked against PyTorch",
                       description="Fold BatchNorm into the convolutions, export with a dynamic "
                       "batch, and check the graph against PyTorch (max |logit diff| < "
                       "--tolerance, same top-1) before reporting success.")
    x.add_argument("weights", help="run directory or weights directory")
    x.add_argument("--format", choices=[*formats(), "onnx-int8"], default="onnx",
                   help="onnx-int8: post-training int8 (ONNX Runtime), calibrated on training "
                   "images of the run's data set")
    x.add_argument("--out", help="folder for the graph (default <weights>/export); a graph "
                   "there is replaced only if exported from the same weights")
    x.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="largest |logit difference| from PyTorch the export may have (a graph "
                   f"above {TOLERANCE:g} is not used by the backends, which export their own)")
    x.add_argument("--calibration-images", type=int, default=512, help="onnx-int8 only")
    x.add_argument("--min-agreement", type=float, default=MIN_CALIBRATION_AGREEMENT,
                   help="onnx-int8: least top-1 agreement with fp32 on the calibration (training) "
                   "images for the graph to be written (default %(default)s: a floor against a "
                   "broken calibration). Using int8 is a second check, on the run's test images, "
                   f"against eval/predict's --min-agreement (default {MIN_AGREEMENT}): the bar "
                   "that counts, so this one is lower")
    x.add_argument("--data", help="onnx-int8: data set, when the weights are not in a run")
    x.add_argument("--data-dir", help="onnx-int8: folder holding the data set's files")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", parents=[common], help="speed benchmarks (docs/performance.md)",
                       description="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items())
                       + ". Options after the name go to the benchmark (NAME --help).")
    b.add_argument("name", choices=list(BENCHMARKS),
                   help="the benchmark; `resnetlab bench NAME --help` gives its own flags")
    b.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    b.set_defaults(func=lambda a: run_benchmark(a.name, a.options))


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "onnx-int8":
        return _int8(args)
    res = export(weights_dir(args.weights), args.format, args.out, args.tolerance)
    print(f"{res.format}: {res.path}")
    print(f"checked against PyTorch on 5 images: max |logit diff| {res.max_abs_diff:.2e}, "
          f"top-1 {'identical' if res.top1_agree else 'DIFFERENT'} ({res.seconds:.1f} s)")
    return 0


def _int8(args: argparse.Namespace) -> int:
    path, agree = quantize_run(args.weights, images=args.calibration_images,
                               min_agreement=args.min_agreement, dataset=args.data,
                               data_dir=args.data_dir)
    print(f"onnx-int8: {path}")
    print(f"calibrated on {args.calibration_images} training images; top-1 agrees with fp32 on "
          f"{100 * agree:.1f}% of them. Accuracy: resnetlab eval {args.weights} "
          "--precision int8 (--backend openvino or onnxruntime)")
    return 0
