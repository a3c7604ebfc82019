"""The GPU check, for a lent GPU machine with a few minutes to spare (tools/gpu_check.sh).

Four parts, each timed, written to one JSON file:
1. the demo preset on the device with precision=auto and compile=true (accuracy, minutes);
2. the resnet50 training step, batch 256, channels_last, bf16 autocast: resnetlab against
   torchvision's resnet50 (v1.5, our resnet50b) under the same settings;
3. a one-rank torchrun run of the smoke preset (NCCL on CUDA, gloo on the CPU);
4. export parity of the weights the device trained (ONNX, checked against PyTorch).

`--device cpu --quick` runs the same code at toy sizes, and the test suite does so, so the
script cannot rot between the rare runs on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torchvision

from ..cli import main as cli
from ..models.factory import create_model
from ..runs import RunDir
from ..train.setup import maybe_compile
from .common import machine, new_file


def _train(out: Path, preset: str, device: str, data_dir: str | None, sets: list[str]
           ) -> dict[str, Any]:
    argv = ["train", "--preset", preset, "--out", str(out), "--set", f"device={device}",
            "--set", "precision=auto", *[a for s in sets for a in ("--set", s)]]
    if data_dir:
        argv += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    code = cli(argv)
    report = json.loads(RunDir(out).eval_report.read_text()) if code == 0 else {}
    return {"exit": code, "wall_s": round(time.perf_counter() - t0, 1),
            "test_accuracy": None if not report else 1 - report["top1_error"],
            "precision": report.get("precision")}


def _step_rate(model: torch.nn.Module, batch: int, size: int, device: torch.device,
               steps: int, compiled: bool) -> float:
    model = maybe_compile(model.to(device).to(memory_format=torch.channels_last), compiled)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    dtype = torch.bfloat16

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def _torchrun(out: Path, device: str, data_dir: str | None, sets: list[str]
              ) -> dict[str, Any]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=1", "-m", "resnetlab", "train", "--preset", "smoke",
            "--out", str(out), "--set", f"device={device}", "--set", "schedule.iterations=10",
            *[a for s in sets for a in ("--set", s)]]
    if data_dir:
        argv += ["--data-dir", data_dir]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    return {"exit": proc.returncode, "wall_s": round(time.perf_counter() - t0, 1),
            "backend": "nccl" if device == "cuda" else "gloo",
            "tail": proc.stderr.strip().splitlines()[-1:] if proc.returncode else []}


def run(device: str, quick: bool, data_dir: str | None, out: Path, verify: bool = True
        ) -> dict[str, Any]:
    dev = torch.device(device)
    res: dict[str, Any] = {"machine": machine(), "device": device, "quick": quick}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    with tempfile.TemporaryDirectory() as tmp:
        demo = Path(tmp) / "demo"
        checks = [] if verify else ["data.verify=false"]  # the suite's files are not official
        preset, sets = ("smoke", ["schedule.iterations=20"]) if quick else ("fashion-mnist", [])
        sets += checks
        # compile on the device; the quick CPU run leaves it out (40 s of compiling a toy)
        res["demo"] = _train(demo, preset, device, data_dir,
                             [*sets, f"compile={'false' if quick else 'true'}"])
        print(f"demo: {res['demo']}", flush=True)
        batch, size, steps = (4, 64, 2) if quick else (256, 224, 20)
        rates = {}
        for who, model in (("resnetlab resnet50b", create_model("resnet50b")),
                           ("torchvision resnet50", torchvision.models.resnet50())):
            rates[who] = _step_rate(model, batch, size, dev, steps, compiled=False)
        res["resnet50_step"] = {"batch": batch, "size": size, "precision": "bf16",
                                "images_per_s": rates,
                                "ratio": rates["resnetlab resnet50b"]
                                / rates["torchvision resnet50"]}
        print(f"resnet50 step: {res['resnet50_step']}", flush=True)
        res["torchrun"] = _torchrun(Path(tmp) / "ddp", device, data_dir, checks)
        print(f"torchrun: {res['torchrun']}", flush=True)
        code = cli(["export", str(demo), "--format", "onnx"]) if res["demo"]["exit"] == 0 \
            else None
        res["export_parity_exit"] = code
    out.write_text(json.dumps(res, indent=2) + "\n")
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench gpu-check",
                                description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="toy sizes (the test suite's run)")
    p.add_argument("--data-dir", default=os.environ.get("FASHION_DIR"),
                   help="Fashion-MNIST files (default: $FASHION_DIR, else resnetlab's search)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the MD5 check of the data files (the suite's own files)")
    p.add_argument("--json", type=new_file,
                   help="a new file for the results (default gpu-check-<UTC time>.json)")
    args = p.parse_args(argv)
    args.json = args.json or time.strftime("gpu-check-%Y%m%dT%H%M%SZ.json", time.gmtime())
    res = run(args.device, args.quick, args.data_dir, Path(args.json), not args.no_verify)
    ok = res["demo"]["exit"] == 0 and res["torchrun"]["exit"] == 0 and \
        res["export_parity_exit"] == 0
    print(f"{'ok' if ok else 'FAILED'}: {args.json}")
    return 0 if ok else 1

