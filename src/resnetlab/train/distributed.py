"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them everything here is a no-op and
training runs in one process. NCCL on GPUs, gloo on CPUs. A process-group timeout bounds
how long the survivors wait for a dead rank; torchrun then ends the job (or restarts it
with --max-restarts, and `--resume auto` continues from the last checkpoint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, choice: str) -> torch.device:
        """`auto`: this rank's GPU if there is one, else the CPU."""
        if choice == "auto":
            choice = "cuda" if torch.cuda.is_available() else "cpu"
        if choice == "cuda":
            return torch.device("cuda", self.local_rank)
        return torch.device(choice)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of `t` over all ranks (a copy; `t` itself is left alone)."""
        if not self.enabled:
            return t
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    def broadcast(self, t: torch.Tensor) -> None:
        """Rank 0's `t` into `t` on every rank, in place."""
        if self.enabled:
            dist.broadcast(t, 0)


def init_from_env(timeout_s: float) -> DistInfo:
    """Join the process group torchrun describes, or return a single-process DistInfo."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        # Each device's own: device=cpu on a GPU machine runs its collectives on gloo.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun keeps one store across --max-restarts rounds; without a per-round prefix
        # the restarted processes read the dead round's addresses and fail to connect.
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"resnetlab-{restart}", store),
                                rank=rank, world_size=world, timeout=timeout)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if torch.cuda.is_available() and info.local_rank < torch.cuda.device_count():
        torch.cuda.set_device(info.local_rank)
    return info


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks (each rank's statistics
    feed every rank's loss)."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone()
        dist.all_reduce(out)
        return out


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm over the global batch on CPUs (gloo), where nn.SyncBatchNorm cannot run.

    Per-channel sums, sums of squares and counts are summed over the ranks in float64 by an
    all-reduce whose backward is again an all-reduce, so gradients flow through the shared
    statistics as they would in one process holding the whole batch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        xd = x.double()
        count = torch.full((1,), x.numel() / x.size(1), dtype=torch.float64)
        stats = _AllReduceSum.apply(torch.cat([xd.sum((0, 2, 3)), (xd * xd).sum((0, 2, 3)),
                                               count]))
        c = x.size(1)
        n = stats[-1]
        mean = stats[:c] / n
        var = stats[c:2 * c] / n - mean * mean
        tracked, run_mean, run_var = self.num_batches_tracked, self.running_mean, self.running_var
        # As nn.BatchNorm2d: without running statistics there is nothing to update.
        if tracked is not None and run_mean is not None and run_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(tracked + 1)
                run_mean.mul_(1 - m).add_(m * mean.float())
                run_var.mul_(1 - m).add_(m * (var * n / (n - 1)).float())
                tracked.add_(1)
        shape = (1, c, 1, 1)
        y = ((xd - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)).float()
        if not self.affine:
            return y
        return y * self.weight.view(shape) + self.bias.view(shape)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm over the global batch: PyTorch's SyncBatchNorm on GPUs, ours on CPUs. Only
    plain BatchNorm2d is converted: a FrozenBatchNorm2d (finetune.freeze) stays frozen, as
    nn.SyncBatchNorm.convert_sync_batchnorm, which converts every subclass, would not keep it."""
    return replace_bn(module, nn.SyncBatchNorm if device.type == "cuda" else CPUSyncBatchNorm,
                      device)


def replace_bn(module: nn.Module, sync_class: type[nn.modules.batchnorm._BatchNorm],
               device: torch.device) -> nn.Module:
    """Each plain BatchNorm2d below `module` replaced by a `sync_class` with its state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = sync_class(child.num_features, child.eps, child.momentum, child.affine,
                              child.track_running_stats).to(device)
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            replace_bn(child, sync_class, device)
    return module


SINGLE_PROCESS = DistInfo()
