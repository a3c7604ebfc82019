"""`resnetlab bench train`: images/s of resnetlab's training step against the usual stack.

Reference (written here, as CIFAR reproductions write it): an eager NCHW CIFAR ResNet with
option-A shortcuts, fed by torchvision per-sample transforms (random crop of the padded
image, flip, to-tensor, normalise) through a DataLoader with worker processes. resnetlab:
the trainer's own pieces: the in-memory loader with whole-batch augmentation, the model in
channels_last, `train_step` (forward, loss, backward, SGD), eager and under torch.compile,
with the trainer's allocator setting (allocator.py). That setting is process-wide, so the
reference runs under it too; `--default-malloc` leaves glibc's defaults for everyone.
Same model size, batch, fp32 numerics and optimizer; where the CPU runs bf16 natively, a
"resnetlab bf16" contender adds the trainer's `precision=auto` step (bf16 autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from ..config import TrainConfig
from ..data.memory import BatchAugment, InMemoryLoader, Normalize
from ..data.sources import ArrayDataset
from ..kernels.fuse import fuse_bn_act
from ..models.complexity import count_params
from ..models.factory import create_model
from ..precision import this_cpu
from ..tables import format_table
from ..train.allocator import keep_freed_memory
from ..train.loop import make_optimizer, train_step
from .common import alternate, machine, ratio, save, sgemm_gflops
from .inputs import PILDataset, synthetic_arrays

log = logging.getLogger(__name__)

QUIET_S = 0.5  # idle seconds after each contender's round; 4 batches take ~0.1 s to refill

CASES = {"resnet20-28x28x1": ("resnet20", 1, 28), "resnet20-32x32x3": ("resnet20", 3, 32),
         "resnet56-32x32x3": ("resnet56", 3, 32), "resnet110-32x32x3": ("resnet110", 3, 32)}


class _RefBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.stride, self.extra = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        sc = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.extra:
            sc = F.pad(sc, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return F.relu(out + sc)


class ReferenceResNet(nn.Module):
    """The usual hand-written CIFAR ResNet (6n+2 layers, option A), plain eager NCHW."""

    def __init__(self, depth: int, in_chans: int, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for i, w in enumerate((16, 32, 64)):
            for j in range(n):
                blocks.append(_RefBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(x.mean((2, 3)))


def _cycle(make: Callable[[int], Any]) -> Iterator[Any]:
    for epoch in itertools.count():
        yield from make(epoch)


def reference_step(depth: int, chans: int, size: int, batch: int, workers: int,
                   n: int) -> Callable[[], int]:
    images, labels = synthetic_arrays(n, chans, size)
    mean, std = [0.5] * chans, [0.25] * chans
    tf = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    loader = DataLoader(PILDataset(images, labels, tf), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    it = _cycle(lambda _: loader)
    model = ReferenceResNet(depth, chans)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def step() -> int:
        x, y = next(it)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(y)

    step.params = count_params(model)  # type: ignore[attr-defined]
    return step


def resnetlab_step(name: str, chans: int, size: int, batch: int, n: int,
                   compiled: bool, precision: str = "fp32") -> Callable[[], int]:
    images, labels = synthetic_arrays(n, chans, size)
    data = ArrayDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(labels), [str(i) for i in range(10)])
    loader = InMemoryLoader(data, batch, Normalize.fit(data.images, "channel"),
                            BatchAugment(4, True), channels_last=True)
    it = _cycle(loader.batches)
    cfg = TrainConfig()
    cfg.optim.lr = 0.05
    core = create_model(name, in_chans=chans, num_classes=10).to(memory_format=torch.channels_last)
    model: nn.Module = core
    if not compiled and precision == "fp32":  # as the trainer does on the CPU (cfg.fused_bn)
        model = fuse_bn_act(core) or core
    model = cast(nn.Module, torch.compile(model)) if compiled else model
    opt, crit = make_optimizer(core, cfg), nn.CrossEntropyLoss()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else \
        contextlib.nullcontext()

    def step() -> int:
        x, y = next(it)
        train_step(model, opt, crit, x, y, cfg, ctx)
        return len(y)

    step.params = count_params(core)  # type: ignore[attr-defined]
    return step


def train_macs(name: str, chans: int, size: int) -> int:
    """Forward multiply-adds of one image (a training step costs about three times this)."""
    from ..models.complexity import meta_model, stage_table

    return sum(r.macs for r in stage_table(meta_model(name, in_chans=chans), size))


def run(cases: list[str], rounds: int, calls: int, batch: int, workers: int,
        compile_: bool, say: Callable[[str], None], tune_malloc: bool = True,
        bf16: bool = False) -> dict[str, Any]:
    malloc = "thresholds raised" if tune_malloc and keep_freed_memory() else "glibc defaults"
    peak = sgemm_gflops()
    say(f"sgemm peak {peak:.0f} GFLOP/s; malloc: {malloc}")
    results: dict[str, Any] = {"machine": machine(), "sgemm_gflops": peak, "batch": batch,
                               "workers": workers, "malloc": malloc, "cases": {}}
    for case in cases:
        name, chans, size = CASES[case]
        depth = int(name.removeprefix("resnet"))
        # Enough batches that no epoch ends during the run: near an epoch's end the
        # reference's workers have nothing left to prepare and stop competing for the cores.
        n = batch * (2 + rounds * calls + 8)
        contenders = {"reference": reference_step(depth, chans, size, batch, workers, n),
                      "resnetlab": resnetlab_step(name, chans, size, batch, n, False)}
        if compile_:
            contenders["resnetlab+compile"] = resnetlab_step(name, chans, size, batch, n, True)
        if bf16:  # what precision=auto trains in where bf16 is native
            contenders["resnetlab bf16"] = resnetlab_step(name, chans, size, batch, n, False,
                                                          "bf16")
        assert len({fn.params for fn in contenders.values()}) == 1, "models differ"  # type: ignore[attr-defined]
        say(f"{case}: {len(contenders)} contenders, {rounds} rounds of {calls} steps")
        # The reference's workers refill their queue (4 batches) after its round; the pause
        # keeps that work out of the next contender's time (it still favours the reference,
        # whose next round starts on banked batches).
        timings = alternate(contenders, rounds, calls, warmup=2, progress=say,
                            quiet_s=QUIET_S if workers else 0.0)
        gflop_per_img = 3 * 2 * train_macs(name, chans, size) / 1e9
        results["cases"][case] = {
            k: {"images_per_s": t.median, "per_round": t.per_round,
                "gflops": t.median * gflop_per_img,
                "peak_fraction": t.median * gflop_per_img / peak,
                "ratio_vs_reference": ratio(t, timings["reference"])}
            for k, t in timings.items()}
    peak_end = sgemm_gflops()
    results["sgemm_gflops_end"] = peak_end
    return results


def report(results: dict[str, Any]) -> str:
    rows = []
    for case, res in results["cases"].items():
        for k, r in res.items():
            rows.append([case, k, f"{r['images_per_s']:.0f}", f"{r['ratio_vs_reference']:.2f}x",
                         f"{r['gflops']:.0f}", f"{100 * r['peak_fraction']:.0f}%"])
    return format_table(["case", "contender", "images/s (median)", "vs reference",
                           "GFLOP/s", "of sgemm peak"], rows, markdown=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="resnetlab bench train", description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3, help="training steps per contender per round")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader workers")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's malloc thresholds (the trainer raises them on the CPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   default=this_cpu().native_bf16,
                   help="add a bf16 autocast contender (default: where bf16 is native)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    res = run(args.cases, args.rounds, args.calls, args.batch, args.workers,
              not args.no_compile, lambda s: print(s, flush=True), not args.default_malloc,
              args.bf16)
    print(f"\nsgemm peak {res['sgemm_gflops']:.0f} GFLOP/s (start), "
          f"{res['sgemm_gflops_end']:.0f} (end); malloc: {res['malloc']}; {res['machine']}")
    print(report(res))
    save(args.json, res)
    return 0
