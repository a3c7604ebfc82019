"""Lookahead of the weights, as the fast CIFAR-10 recipes use it (Zhang et al. 2019,
"Lookahead Optimizer: k steps forward, 1 step back"; the schedule of
KellerJordan/cifar10-airbench's airbench94).

The slow copy is taken after the first step. Every EVERY steps the weights and BN
statistics are pulled into it and then reset to it: slow <- keep * slow + (1 - keep) * fast.
`keep` grows as KEEP_MAX * (t / T)^3, so the early steps, at a high lr, are left alone and
the late ones are averaged. The last step returns the weights to the slow copy (keep 1;
airbench94 first pulls once more when T is a multiple of EVERY, here the last steps since
the previous pull, at the schedule's smallest lr, are dropped); evaluations score that and
final/ holds it, or, with `ema_decay`, the average of the weights after each step.
Under data parallelism the slow BN statistics are rank 0's at every pull: without sync_bn
each rank's own differ, and rank 0's are the ones a checkpoint keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from .distributed import SINGLE_PROCESS, DistInfo

EVERY = 5  # steps between pulls
KEEP_MAX = 0.95**EVERY  # `keep` at the last pull: a per-step average of 0.95


def keep(it: int, total: int) -> float:
    """The weight of the slow copy at the pull after step `it` of `total` (1 at the end)."""
    return 1.0 if it >= total else KEEP_MAX * (it / total) ** 3


class Lookahead:
    """The slow copy of `model`'s floating-point state (parameters and BN statistics)."""

    def __init__(self, model: nn.Module, dist: DistInfo = SINGLE_PROCESS) -> None:
        self.model, self.dist = model, dist
        self.slow: dict[str, torch.Tensor] = {}
        self.buffers = {name for name, _ in model.named_buffers()}

    @torch.no_grad()
    def after_step(self, it: int, total: int) -> None:
        """After step `it` (counted from 1): the slow copy's first take, and the pull and
        reset if the step is due for one."""
        due = it % EVERY == 0 or it >= total
        if self.slow and not due:
            return
        fast = self.model.state_dict()
        self.slow = self.slow or {k: v.detach().clone() for k, v in fast.items()
                                  if v.is_floating_point()}
        if not due:
            return
        k = keep(it, total)
        for name, slow in self.slow.items():  # state_dict order: the same on every rank
            slow.lerp_(fast[name], 1.0 - k)
            if name in self.buffers:
                self.dist.broadcast(slow)
            fast[name].copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint's slow copy, on the model's device and in its memory format."""
        fast = self.model.state_dict()
        self.slow = {k: torch.empty_like(fast[k]).copy_(v) for k, v in state.items()}
