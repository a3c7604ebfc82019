"""Learning rate as a function of the iteration (the paper counts iterations, not epochs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ScheduleConfig


@dataclass
class WarmupState:
    """The paper's 110-layer warm-up ends on a condition, so it is state to checkpoint."""

    done: bool = False
    ended_at: int = -1


class LRSchedule:
    def __init__(self, cfg: ScheduleConfig, base_lr: float) -> None:
        self.cfg, self.base_lr = cfg, base_lr
        self.warmup = WarmupState(done=cfg.warmup_until_error <= 0)

    def observe_train_error(self, iteration: int, error: float) -> None:
        """Feed the recent training error; ends a conditional warm-up (paper sec. 4.2)."""
        if not self.warmup.done and error < self.cfg.warmup_until_error:
            self.warmup = WarmupState(True, iteration)

    def __call__(self, it: int) -> float:
        c = self.cfg
        if not self.warmup.done:
            return c.warmup_lr
        if it < c.warmup_iters:
            return c.warmup_lr + (self._main(c.warmup_iters) - c.warmup_lr) * it / c.warmup_iters
        return self._main(it)

    def _main(self, it: int) -> float:
        c, lr = self.cfg, self.base_lr
        if c.kind == "constant":
            return lr
        if c.kind == "multistep":
            return lr * c.gamma ** sum(it >= m for m in c.milestones)
        start = c.warmup_iters if c.kind == "onecycle" else 0
        span = max(1, c.iterations - start)
        t = min(1.0, max(0, it - start) / span)
        if c.kind == "cosine":
            return c.final_lr + (lr - c.final_lr) * 0.5 * (1 + math.cos(math.pi * t))
        # one-cycle: linear ramp up (the warm-up above), then linear decay to final_lr
        return lr + (c.final_lr - lr) * t

    def state_dict(self) -> dict[str, int | bool]:
        return {"warmup_done": self.warmup.done, "warmup_ended_at": self.warmup.ended_at}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        self.warmup = WarmupState(bool(state["warmup_done"]), int(state["warmup_ended_at"]))
