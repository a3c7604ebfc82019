"""`resnetlab bench train`: images/s of resnetlab's training step against the usual stack.

Reference (written here, as CIFAR reproductions write it): an eager NCHW CIFAR ResNet with
option-A shortcuts, fed by torchvision per-sample transforms (random crop of the padded
image, flip, to-tensor, normalise) through a DataLoader with worker processes. resnetlab:
the trainer's own pieces: the in-memory loader with whole-batch augmentation, the model in
channels_last, `train_step` (forward, loss, backward, SGD), eager and under torch.compile,
with the trainer's allocator setting (allocator.py). That setting is process-wide, so the
reference runs under it too; `--default-malloc` leaves glibc's defaults for everyone.
Same model size, batch, fp32 numerics and optimizer; where the CPU runs bf16 natively, a
"resnetlab bf16" contender adds the trainer's `precision=auto` step (bf16 autocast), and
"user's best bf16" what a user would write for fast CPU training without resnetlab: the
reference's model in channels_last under bf16 autocast, plain SGD, fed by resnetlab's
in-memory loader, so that only the model code and the step differ from "resnetlab bf16".
Each contender's GFLOP/s is put as a fraction of the gemm rate of the precision it ran in.
`--profile CONTENDER` shows where one contender's step spends its time (profile.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function
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
from .common import alternate, gemm_gflops, machine, new_file, ratio, save, sgemm_gflops
from .inputs import PILDataset, synthetic_arrays
from .profile import DATA_SCOPE, format_profile, profile_steps

log = logging.getLogger(__name__)

QUIET_S = 0.5  # idle seconds after each contender's round; 4 batches take ~0.1 s to refill

CASES = {"resnet20-28x28x1": ("resnet20", 1, 28), "resnet20-32x32x3": ("resnet20", 3, 32),
         "resnet56-32x32x3": ("resnet56", 3, 32), "resnet110-32x32x3": ("resnet110", 3, 32)}
USERS_BEST = "user's best bf16"
CONTENDERS = ("reference", "resnetlab", "resnetlab+compile", "resnetlab bf16", USERS_BEST)
LR = 0.05  # every contender's; momentum 0.9 and weight decay 1e-4 as the config's


class Step(Protocol):
    """One training step of a contender; returns the number of images it took."""

    params: int  # the model's parameters: every contender must train the same model size
    precision: str  # "fp32" or "bf16": whose gemm rate its GFLOP/s is put against

    def __call__(self) -> int: ...


def _step(fn: Callable[[], int], model: nn.Module, precision: str) -> Step:
    step = cast(Step, fn)
    step.params, step.precision = count_params(model), precision
    return step


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


def _fetch(it: Iterator[Any]) -> Any:
    # Named for `--profile`, which counts this time as data; off the profiler it costs a
    # few microseconds a step.
    with record_function(DATA_SCOPE):
        return next(it)


def _memory_batches(chans: int, size: int, batch: int,
                    n: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The trainer's in-memory loader (whole-batch augmentation, channels_last) over n
    synthetic images, epoch after epoch."""
    images, labels = synthetic_arrays(n, chans, size)
    data = ArrayDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                        torch.from_numpy(labels), [str(i) for i in range(10)])
    loader = InMemoryLoader(data, batch, Normalize.fit(data.images, "channel"),
                            BatchAugment(4, True), channels_last=True)
    return _cycle(loader.batches)


def _plain_sgd(model: nn.Module) -> torch.optim.SGD:
    """The optimizer as CIFAR reproductions write it: weight decay on every parameter."""
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)


def reference_step(depth: int, chans: int, size: int, batch: int, workers: int,
                   n: int) -> Step:
    images, labels = synthetic_arrays(n, chans, size)
    mean, std = [0.5] * chans, [0.25] * chans
    tf = v2.Compose([v2.RandomCrop(size, padding=4), v2.RandomHorizontalFlip(), v2.ToImage(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    loader = DataLoader(PILDataset(images, labels, tf), batch_size=batch, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    it = _cycle(lambda _: loader)
    return _eager_step(ReferenceResNet(depth, chans), it, "fp32")


def users_best_step(depth: int, chans: int, size: int, batch: int, n: int) -> Step:
    """The reference's model as a user would speed it up on a bf16 CPU without resnetlab:
    channels_last, eager, the PyTorch recipe's bf16 autocast around forward and loss, plain
    SGD, fed by the same in-memory batches as resnetlab."""
    model = ReferenceResNet(depth, chans).to(memory_format=torch.channels_last)
    return _eager_step(model, _memory_batches(chans, size, batch, n), "bf16")


def _eager_step(model: nn.Module, it: Iterator[tuple[torch.Tensor, torch.Tensor]],
                precision: str) -> Step:
    """The plain eager step a user writes: forward and loss (under bf16 autocast for
    "bf16"), backward, plain SGD."""
    opt = _plain_sgd(model)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else \
        contextlib.nullcontext()

    def step() -> int:
        x, y = _fetch(it)
        with ctx:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(y)

    return _step(step, model, precision)


def resnetlab_step(name: str, chans: int, size: int, batch: int, n: int,
                   compiled: bool, precision: str = "fp32") -> Step:
    it = _memory_batches(chans, size, batch, n)
    cfg = TrainConfig()
    cfg.optim.lr = LR
    core = create_model(name, in_chans=chans, num_classes=10).to(memory_format=torch.channels_last)
    model: nn.Module = core
    if not compiled:  # as the trainer does on the CPU (cfg.fused_bn), fp32 and bf16 alike
        model = fuse_bn_act(core) or core
    model = cast(nn.Module, torch.compile(model)) if compiled else model
    opt, crit = make_optimizer(core, cfg), nn.CrossEntropyLoss()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else \
        contextlib.nullcontext()

    def step() -> int:
        x, y = _fetch(it)
        train_step(model, opt, crit, x, y, cfg, ctx)
        return len(y)

    return _step(step, core, precision)


def make_contender(which: str, case: str, batch: int, workers: int, n: int) -> Step:
    """Contender `which` (one of CONTENDERS) on `case`, over n synthetic images."""
    name, chans, size = CASES[case]
    depth = int(name.removeprefix("resnet"))
    if which == "reference":
        return reference_step(depth, chans, size, batch, workers, n)
    if which == USERS_BEST:
        return users_best_step(depth, chans, size, batch, n)
    return resnetlab_step(name, chans, size, batch, n, which == "resnetlab+compile",
                          "bf16" if which == "resnetlab bf16" else "fp32")


def train_macs(name: str, chans: int, size: int) -> int:
    """Forward multiply-adds of one image (a training step costs about three times this)."""
    from ..models.complexity import meta_model, stage_table

    return sum(r.macs for r in stage_table(meta_model(name, in_chans=chans), size))


def _malloc(tune: bool) -> str:
    return "thresholds raised" if tune and keep_freed_memory() else "glibc defaults"


def run(cases: list[str], rounds: int, calls: int, batch: int, workers: int,
        compile_: bool, say: Callable[[str], None], tune_malloc: bool = True,
        bf16: bool = False) -> dict[str, Any]:
    malloc = _malloc(tune_malloc)
    names = ["reference", "resnetlab", *(["resnetlab+compile"] if compile_ else []),
             *(["resnetlab bf16", USERS_BEST] if bf16 else [])]
    # Each contender is put against the gemm rate of the precision it runs in: bf16 is
    # 2-6x the sgemm rate where it is native, and far below it where it is emulated.
    peaks = {"fp32": sgemm_gflops()}
    if bf16:
        peaks["bf16"] = gemm_gflops(torch.bfloat16)
    say(", ".join(f"{k} gemm peak {v:.0f} GFLOP/s" for k, v in peaks.items())
        + f"; malloc: {malloc}")
    results: dict[str, Any] = {"machine": machine(), "sgemm_gflops": peaks["fp32"],
                               "batch": batch, "workers": workers, "malloc": malloc,
                               "cases": {}}
    if bf16:
        results["bf16_gemm_gflops"] = peaks["bf16"]
    for case in cases:
        name, chans, size = CASES[case]
        # Enough batches that no epoch ends during the run: near an epoch's end the
        # reference's workers have nothing left to prepare and stop competing for the cores.
        n = batch * (2 + rounds * calls + 8)
        contenders = {k: make_contender(k, case, batch, workers, n) for k in names}
        assert len({fn.params for fn in contenders.values()}) == 1, "models differ"
        say(f"{case}: {len(contenders)} contenders, {rounds} rounds of {calls} steps")
        # The reference's workers refill their queue (4 batches) after its round; the pause
        # keeps that work out of the next contender's time (it still favours the reference,
        # whose next round starts on banked batches).
        timings = alternate(contenders, rounds, calls, warmup=2, progress=say,
                            quiet_s=QUIET_S if workers else 0.0)
        gflop_per_img = 3 * 2 * train_macs(name, chans, size) / 1e9
        best = timings.get(USERS_BEST)
        out: dict[str, Any] = {}
        for k, t in timings.items():
            prec = contenders[k].precision
            out[k] = {"images_per_s": t.median, "per_round": t.per_round, "precision": prec,
                      "gflops": t.median * gflop_per_img, "peak_gflops": peaks[prec],
                      "peak_fraction": t.median * gflop_per_img / peaks[prec],
                      "ratio_vs_reference": ratio(t, timings["reference"])}
            if best is not None:
                out[k]["ratio_vs_users_best"] = ratio(t, best)
        results["cases"][case] = out
    results["sgemm_gflops_end"] = sgemm_gflops()
    return results


def profile(cases: list[str], contender: str, steps: int, batch: int, workers: int,
            say: Callable[[str], None], tune_malloc: bool = True) -> dict[str, Any]:
    """Where `contender`'s step spends its time on each case (profile.py), instead of
    timing rounds."""
    malloc = _malloc(tune_malloc)
    tables: dict[str, Any] = {}
    for case in cases:
        step = make_contender(contender, case, batch, workers, batch * (2 + steps + 8))
        say(f"{case}: profiling {steps} steps of {contender}")
        tables[case] = profile_steps(step, steps, warmup=2)
    return {"machine": machine(), "batch": batch, "workers": workers, "malloc": malloc,
            "profile": {"contender": contender, "steps": steps, "cases": tables}}


def report(results: dict[str, Any]) -> str:
    cases = results["cases"]
    with_best = any("ratio_vs_users_best" in r for res in cases.values() for r in res.values())
    rows = []
    for case, res in cases.items():
        for k, r in res.items():
            best = r.get("ratio_vs_users_best")
            vs_best = ["" if best is None else f"{best:.2f}x"] if with_best else []
            rows.append([case, k, r.get("precision", "fp32"), f"{r['images_per_s']:.0f}",
                         f"{r['ratio_vs_reference']:.2f}x", *vs_best, f"{r['gflops']:.0f}",
                         f"{100 * r['peak_fraction']:.0f}%"])
    headers = ["case", "contender", "precision", "images/s (median)", "vs reference",
               *(["vs user's best"] if with_best else []), "GFLOP/s",
               "of its precision's gemm peak"]
    lines = [format_table(headers, rows, markdown=True)]
    for case, res in cases.items():
        if "resnetlab bf16" in res and "ratio_vs_users_best" in res["resnetlab bf16"]:
            lines.append(f"{case}: resnetlab bf16 / {USERS_BEST}: "
                         f"{res['resnetlab bf16']['ratio_vs_users_best']:.2f}x "
                         "(issue 32's bar where the CPU has AMX: 1.25x)")
    return "\n".join(lines)


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
                   help=f"add the bf16 autocast contenders, resnetlab's and {USERS_BEST!r} "
                        "(default: where bf16 is native)")
    p.add_argument("--profile", choices=CONTENDERS, metavar="CONTENDER",
                   help="instead of timing, show where this contender's step spends its time "
                        f"(one of: {', '.join(map(repr, CONTENDERS))})")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="steps profiled, after 2 of warm-up")
    p.add_argument("--json", type=new_file, help="write the results here (a new file)")
    args = p.parse_args(argv)
    say = partial(print, flush=True)
    if args.profile:
        res = profile(args.cases, args.profile, args.profile_steps, args.batch, args.workers,
                      say, not args.default_malloc)
        for case, table in res["profile"]["cases"].items():
            print(f"\n{case}, {args.profile}, batch {args.batch}: {format_profile(table)}")
        save(args.json, res)
        return 0
    res = run(args.cases, args.rounds, args.calls, args.batch, args.workers,
              not args.no_compile, say, not args.default_malloc, args.bf16)
    bf16_peak = f", bf16 gemm {res['bf16_gemm_gflops']:.0f}" if "bf16_gemm_gflops" in res else ""
    print(f"\nsgemm peak {res['sgemm_gflops']:.0f} GFLOP/s (start), "
          f"{res['sgemm_gflops_end']:.0f} (end){bf16_peak}; malloc: {res['malloc']}; "
          f"{res['machine']}")
    print(report(res))
    save(args.json, res)
    return 0
