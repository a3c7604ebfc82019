"""`resnetlab export` and `resnetlab bench`: thin wrappers over deploy/ and benchmarks/."""

from __future__ import annotations

import argparse

from .benchmarks import BENCHMARKS, run_benchmark
from .deploy.export import FORMATS, export
from .predict import weights_dir


def add_deploy_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    x = sub.add_parser("export", parents=[common],
                       help="write ONNX / OpenVINO / TorchScript, checked against PyTorch",
                       description="Fold BatchNorm into the convolutions, export with a dynamic "
                       "batch, and check the graph against PyTorch (max |logit diff| < "
                       "--tolerance, same top-1) before reporting success.")
    x.add_argument("weights", help="run directory or weights directory")
    x.add_argument("--format", choices=FORMATS, default="onnx")
    x.add_argument("--out", help="folder for the graph (default <weights>/export)")
    x.add_argument("--tolerance", type=float, default=1e-3)
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", parents=[common], help="speed benchmarks (docs/performance.md)",
                       description="; ".join(f"{k}: {v[1]}" for k, v in BENCHMARKS.items())
                       + ". Options after the name go to the benchmark (NAME --help).")
    b.add_argument("name", choices=list(BENCHMARKS))
    b.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")
    b.set_defaults(func=lambda a: run_benchmark(a.name, a.options))


def cmd_export(args: argparse.Namespace) -> int:
    res = export(weights_dir(args.weights), args.format, args.out, args.tolerance)
    print(f"{res.format}: {res.path}")
    print(f"checked against PyTorch on 5 images: max |logit diff| {res.max_abs_diff:.2e}, "
          f"top-1 {'identical' if res.top1_agree else 'DIFFERENT'} ({res.seconds:.1f} s)")
    return 0
