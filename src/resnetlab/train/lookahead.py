"""Lookahead of the weights, as the fast CIFAR-10 recipes use it (Zhang et al. 2019,
"Lookahead Optimizer: k steps forward, 1 step back"; the schedule of
KellerJordan/cifar10-airbench's airbench94).

The slow copy is taken after the first step. Every EVERY steps the weights and BN
statistics are pulled into it and then reset to it: slow <- keep * slow + (1 - keep) * fast.
`keep` grows as KEEP_MAX * (t / T)^3, so the early steps, at a high lr, are left alone and
the late ones are averaged; the last step leaves the slow copy, which is what evaluations
then score and final/ holds.
"""

from __future__ import annotations

import torch
from torch import nn

EVERY = 5  # steps between pulls
KEEP_MAX = 0.95**EVERY  # `keep` at the last pull: a per-step average of 0.95


def keep(it: int, total: int) -> float:
    """The weight of the slow copy at the pull after step `it` of `total` (1 at the end)."""
    return 1.0 if it >= total else KEEP_MAX * (it / total) ** 3


class Lookahead:
    """The slow copy of `model`'s floating-point state (parameters and BN statistics)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.slow: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def after_step(self, it: int, total: int) -> None:
        """After step `it` (counted from 1): the slow copy's first take, and the pull and
        reset if the step is due for one."""
        fast = self.model.state_dict()
        if not self.slow:
            self.slow = {k: v.detach().clone() for k, v in fast.items() if v.is_floating_point()}
        if it % EVERY and it < total:
            return
        k = keep(it, total)
        for name, slow in self.slow.items():
            slow.lerp_(fast[name], 1.0 - k)
            fast[name].copy_(slow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.slow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """A checkpoint's slow copy, on the model's device and in its memory format."""
        fast = self.model.state_dict()
        self.slow = {k: torch.empty_like(fast[k]).copy_(v) for k, v in state.items()}
