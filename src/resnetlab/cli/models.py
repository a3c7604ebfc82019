"""`resnetlab models | info`: the model table, one model's stages, this machine."""

from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from ..models.complexity import meta_model, model_summary, stage_table
from ..models.registry import PAPER_MACS, get_spec, list_models
from ..tables import format_table


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


MACS_NOTE = ("mult-adds = multiply-accumulates of convolutions and the fc layer, the unit the "
             "paper calls FLOPs (torch's FlopCounter reports twice this).")


def cmd_models(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        print(f"no model matches {args.pattern!r}; `resnetlab models` lists them all",
              file=sys.stderr)
        return 2
    rows = []
    for name in tqdm(names, desc="counting", unit="model", leave=False,
                     disable=not sys.stderr.isatty()):
        s = model_summary(name)
        rows.append([s["name"], s["family"], s["block"], s["shortcut"], s["depth"],
                     f"{s['params']:,}", f"{_human(s['macs'])} @{s['input_size']}px"])
    print(format_table(["model", "family", "block", "shortcut", "depth", "params",
                        "mult-adds"], rows))
    print(f"\n{len(rows)} models. {MACS_NOTE}")
    return 0


def cmd_machine() -> int:
    from ..benchmarks.common import machine_report

    r = machine_report()
    print(f"CPU: {r['cpu']} ({r['kind']}), {r['cores']} cores, {r['torch_threads']} torch "
          f"threads; torch {r['torch']}")
    print(f"flags: {', '.join(r['flags']) or 'none of interest'}"  # type: ignore[arg-type]
          + (f"; ONEDNN_MAX_CPU_ISA={r['onednn_max_cpu_isa']}" if r["onednn_max_cpu_isa"]
             else ""))
    print(f"native bf16: {'yes' if r['native_bf16'] else 'no'}; native int8 (VNNI/AMX): "
          f"{'yes' if r['native_int8'] else 'no'}")
    print(f"measured: sgemm {r['sgemm_gflops']:.0f} GFLOP/s, bf16 gemm "
          f"{r['bf16_gemm_gflops']:.0f} GFLOP/s")
    infer = r["infer_auto"]
    assert isinstance(infer, dict)
    print(f"precision=auto picks: training {r['train_auto']}; inference "
          + ", ".join(f"{b} {p}" for b, p in infer.items())
          + " (a reduced precision only once its agreement check passes)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.machine:
        return cmd_machine()
    if not args.model:
        print("info needs a model name (e.g. resnet50), or --machine", file=sys.stderr)
        return 2
    spec = get_spec(args.model)
    size = args.input_size or spec.input_size
    kwargs = {k: v for k, v in (("in_chans", args.in_chans), ("num_classes", args.num_classes))
              if v is not None}
    model = meta_model(args.model, **kwargs)
    rows = stage_table(model, size)
    paper: dict[str, str] = {}
    if spec.family == "imagenet":
        paper = {"stem": "conv1 + pool", "head": "fc",  # Table 1 lists the pool in conv2_x
                 **{n: f"conv{i + 2}_x" for i, n in enumerate(model.stage_names)}}
    body = [[r.name, paper.get(r.name, ""), "x".join(map(str, r.output)), r.blocks or "",
             f"{r.params:,}", _human(r.macs)] for r in rows]
    body.append(["total", "", "", sum(r.blocks for r in rows),
                 f"{sum(r.params for r in rows):,}", _human(sum(r.macs for r in rows))])
    stride = "" if spec.block != "bottleneck" else \
        (" (stride on the 3x3)" if spec.arch.get("stride_in_3x3") else " (stride on the first 1x1)")
    print(f"{args.model}: {spec.family} family, {spec.block} blocks{stride}, shortcut "
          f"{spec.shortcut}, input {model.in_chans}x{size}x{size}, {model.num_classes} classes")
    print(format_table(["stage", "paper", "output", "blocks", "params", "mult-adds"], body))
    if args.model in PAPER_MACS and size == 224 and model.in_chans == 3:
        print(f"paper Table 1: {PAPER_MACS[args.model]:.1e} mult-adds")
    print(MACS_NOTE)
    return 0


def add_model_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    m = sub.add_parser("models", parents=[common], help="table of every registered model")
    m.add_argument("pattern", nargs="?", default="*", help="shell pattern, e.g. 'resnet5*'")
    m.set_defaults(func=cmd_models)

    i = sub.add_parser("info", parents=[common],
                       help="per-stage table of one model (paper Table 1 style), or --machine")
    i.add_argument("model", nargs="?", help="a registered model (resnetlab models lists them)")
    i.add_argument("--machine", action="store_true",
                   help="this CPU: ISA flags, measured gemm rates, what precision=auto picks")
    i.add_argument("--input-size", type=int, help="square input side (default: native)")
    i.add_argument("--in-chans", type=int, help="input channels (default 3)")
    i.add_argument("--num-classes", type=int, help="classes of the fc layer")
    i.set_defaults(func=cmd_info)
