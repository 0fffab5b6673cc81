"""Learning-rate schedule: linear warmup, then cosine decay to a floor (spec of `ScheduleConfig`)."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """The lr for optimizer step ``step`` (1-based): ``peak·step/warmup_steps`` while ``step <= warmup_steps``,
    then ``min_lr + (peak − min_lr)·(1 + cos(π·p))/2`` with ``p = (step − warmup)/(total − warmup)``, so
    the last step (``step == total_steps``) uses ``min_lr``."""
    if step <= warmup_steps:
        return peak * step / warmup_steps
    if total_steps == warmup_steps:
        return peak
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LRSchedule:
    """Sets every param group's lr to its configured lr scaled by ``lr_at(step) / peak``, so groups with
    different base lrs keep their ratios."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, peak: float, warmup_steps: int, total_steps: int, min_lr: float
    ) -> None:
        self.optimizer = optimizer
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.peak = peak
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr

    def apply(self, step: int) -> float:
        """Sets the lrs for optimizer step ``step``; returns the scheduled (peak-relative) lr."""
        lr = lr_at(step, self.peak, self.warmup_steps, self.total_steps, self.min_lr)
        scale = lr / self.peak if self.peak > 0 else 0.0
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * scale
        return lr
