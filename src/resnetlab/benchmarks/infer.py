"""`resnetlab bench infer`: images/s at 224x224 for batch 1 and 32.

Contenders: torchvision's eager fp32 model (the reference, holding the same weights), each
resnetlab backend (`load_backend`: torch, onnxruntime, openvino) at each precision asked
for (default: fp32 and whatever this CPU runs natively), and stand-alone ONNX Runtime and
OpenVINO driving the very graph resnetlab exported at the same precision, with nothing
around them: the bar our wrapping must not fall below. Before timing, every contender's
logits are compared with the reference on one batch (max |difference| and top-1; reduced
precisions differ by design, and random weights make their top-1 a coin toss).
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from ..deploy.backends import exported, load_backend
from ..deploy.quantize import quantize_int8
from ..deploy.runtimes import INPUT, RUNTIMES, OpenVINORunner, openvino_props, ort_session
from ..models.complexity import model_summary
from ..models.convert import to_torchvision
from ..models.factory import create_model, save_weights
from ..precision import this_cpu
from ..tables import format_table
from .common import Timing, alternate, gemm_gflops, machine, new_file, ratio, save, sgemm_gflops

# torchvision builds v1.5 (stride on the 3x3): our resnet50b; resnet18 is the same in both.
OURS = {"resnet18": "resnet18", "resnet50": "resnet50b"}


@functools.cache
def macs(model: str) -> float:
    """Multiply-adds at 224 of the net timed as `model` (v1.5's 4.09 G, not v1's 3.86 G)."""
    return float(model_summary(OURS[model])["macs"])
REFERENCE = "torchvision eager fp32"
# Idle seconds after each contender's round, untimed. PyTorch's OpenMP workers and ONNX
# Runtime's thread pool keep spinning after a call (on a 2-core EPYC: for ~25 ms and
# ~100 ms), slowing whoever is timed next, and the rotation keeps who is next fixed:
# `resnetlab openvino bf16` always ran right after `resnetlab torch bf16` while its
# stand-alone counterpart ran after it (the likely cause of issue 32's 0.92x).
QUIET_S = 0.2


def standalone_ort(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    s = ort_session(path)
    return lambda x: s.run(None, {INPUT: x})[0]


def standalone_openvino(path: Path, precision: str = "fp32"
                        ) -> Callable[[np.ndarray], np.ndarray]:
    """The infer request alone (OpenVINORunner keeps its owners alive), without the
    backend's second copy of the output (`infer` already returns a copy of it)."""
    runner = OpenVINORunner(path, openvino_props(precision, PERFORMANCE_HINT="LATENCY"))
    return lambda x: runner.request.infer({0: x})[0]


def _timed(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], int]:
    def call() -> int:
        fn(x)
        return len(x)

    return call


def native_precisions() -> list[str]:
    """fp32, and the reduced precisions this CPU runs natively."""
    cpu = this_cpu()
    return ["fp32", *(["bf16"] if cpu.native_bf16 else []),
            *(["int8"] if cpu.native_int8 else [])]


def _int8(weights: Path, size: int) -> Path:
    """An int8 graph for timing only: calibrated on random images (random weights have no
    real images); its agreement with fp32 is measured on trained models (eval), not here."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 3, size, size, generator=gen) for _ in range(4)]
    path, _ = quantize_int8(weights, batches, images=32, min_agreement=0.0)
    return path


def contenders(model: str, weights: Path, precisions: list[str] | None = None
               ) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Name -> logits function. Names are `<who> <runtime> <precision>`, the reference is
    torchvision's eager model in fp32; stand-alone runtimes run at the stated precision."""
    precisions = precisions or ["fp32"]
    ours = create_model(OURS[model], weights=weights).eval()
    tv = getattr(torchvision.models, model)()
    tv.load_state_dict(to_torchvision(ours.state_dict()))
    tv.eval()

    @torch.inference_mode()
    def eager(x: torch.Tensor) -> torch.Tensor:
        return tv(x)

    out: dict[str, Callable[[torch.Tensor], Any]] = {REFERENCE: eager}
    ort, ov = RUNTIMES["onnxruntime"], RUNTIMES["openvino"]
    if not ort.available():  # it quantises the int8 graph
        precisions = [p for p in precisions if p != "int8"]
    int8 = _int8(weights, 224) if "int8" in precisions else None
    for prec in precisions:
        for rt in (RUNTIMES["torch"], ort, ov):
            if rt.available() and prec in rt.precisions:
                out[f"resnetlab {rt.name} {prec}"] = load_backend(weights, rt.name,
                                                                  precision=prec)
        if ort.available() and prec in ort.precisions:
            graph = int8 if int8 and prec == "int8" else exported(weights, ort)
            out[f"stand-alone onnxruntime {prec}"] = _on_numpy(standalone_ort(graph))
        if ov.available():
            graph = int8 if int8 and prec == "int8" else exported(weights, ov)
            out[f"stand-alone openvino {prec}"] = _on_numpy(standalone_openvino(graph, prec))
    return out


def _on_numpy(f: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], np.ndarray]:
    return lambda x: f(x.numpy())


def ratio_range(a: Timing, b: Timing) -> tuple[float, float]:
    """Min and max over rounds of a/b: the spread around `ratio`'s median."""
    rs = [x / y for x, y in zip(a.per_round, b.per_round, strict=True)]
    return min(rs), max(rs)


def parity(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor) -> dict[str, Any]:
    ref = fns[REFERENCE](x).numpy()
    res = {}
    for name, fn in fns.items():
        got = np.asarray(fn(x))
        res[name] = {"max_abs_diff": float(np.abs(got - ref).max()),
                     "top1_identical": bool((got.argmax(1) == ref.argmax(1)).all())}
    return res


def run(models: list[str], batches: list[int], rounds: int, seconds: float,
        say: Callable[[str], None], precisions: list[str] | None = None) -> dict[str, Any]:
    peak = sgemm_gflops()
    say(f"sgemm peak {peak:.0f} GFLOP/s")
    results: dict[str, Any] = {"machine": machine(), "sgemm_gflops": peak,
                               "bf16_gemm_gflops": gemm_gflops(torch.bfloat16), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            weights = Path(tmp) / model
            save_weights(create_model(OURS[model]), weights)
            say(f"{model}: exporting and loading backends")
            fns = contenders(model, weights, precisions)
            for batch in batches:
                x = torch.randn(batch, 3, 224, 224)
                checks = parity(fns, x)
                # Calls per round so that each contender runs about `seconds` per round.
                est = 50e9 / (macs(model) * 2)  # images/s at a modest 50 GFLOP/s
                calls = max(1, round(seconds * est / batch))
                say(f"{model} batch {batch}: {rounds} rounds of {calls} calls")
                t = alternate({k: _timed(f, x) for k, f in fns.items()}, rounds, calls, warmup=2,
                              progress=say, quiet_s=QUIET_S)
                ref = t[REFERENCE]
                case = {}
                for k, tk in t.items():
                    gflops = tk.median * 2 * macs(model) / 1e9
                    case[k] = {"images_per_s": tk.median, "per_round": tk.per_round,
                               "ratio_vs_eager": ratio(tk, ref), "gflops": gflops,
                               "peak_fraction": gflops / peak, **checks[k]}
                for k in t:
                    alone = k.replace("resnetlab ", "stand-alone ", 1)
                    if k.startswith("resnetlab ") and alone in t:
                        lo, hi = ratio_range(t[k], t[alone])
                        case[k].update(ratio_vs_standalone=ratio(t[k], t[alone]),
                                       ratio_vs_standalone_min=lo, ratio_vs_standalone_max=hi)
                results["cases"][f"{model} batch {batch}"] = case
    results["sgemm_gflops_end"] = sgemm_gflops()
    return results


def report(results: dict[str, Any]) -> str:
    rows = []
    for case, res in results["cases"].items():
        for k, r in res.items():
            vs = r.get("ratio_vs_standalone")
            spread = "" if vs is None else \
                f"{r['ratio_vs_standalone_min']:.2f}-{r['ratio_vs_standalone_max']:.2f}x"
            rows.append([case, k, f"{r['images_per_s']:.1f}", f"{r['ratio_vs_eager']:.2f}x",
                         "" if vs is None else f"{vs:.2f}x", spread, f"{r['gflops']:.0f}",
                         f"{100 * r['peak_fraction']:.0f}%", f"{r['max_abs_diff']:.1e}",
                         "yes" if r["top1_identical"] else "NO"])
    return format_table(["case", "contender", "images/s", "vs eager", "vs stand-alone",
                         "per-round range", "GFLOP/s", "of sgemm peak", "max logit diff",
                         "same top-1"], rows, markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench infer", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=list(OURS), default=list(OURS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0,
                   help="rough time per contender per round")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "int8"],
                   default=native_precisions(),
                   help="default: fp32 and what this CPU runs natively (%(default)s)")
    p.add_argument("--json", type=new_file, help="write the results here (a new file)")
    args = p.parse_args(argv)
    res = run(args.models, args.batches, args.rounds, args.seconds,
              lambda s: print(s, flush=True), args.precisions)
    print(f"\nsgemm peak {res['sgemm_gflops']:.0f} GFLOP/s (start), "
          f"{res['sgemm_gflops_end']:.0f} (end), bf16 gemm {res['bf16_gemm_gflops']:.0f}; "
          f"{res['machine']}")
    print(report(res))
    save(args.json, res)
    return 0
