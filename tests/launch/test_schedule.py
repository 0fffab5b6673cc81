"""Linear warmup then cosine decay to min_lr, applied to every param group in proportion."""
from __future__ import annotations

import math

import pytest
import torch

from launch.schedule import LRSchedule, lr_at


def test_warmup_is_linear_and_the_peak_is_reached() -> None:
    assert [lr_at(s, 1.0, 4, 20, 0.1) for s in (1, 2, 4)] == [0.25, 0.5, 1.0]


def test_cosine_decays_to_min_lr_on_the_last_step() -> None:
    assert lr_at(20, 1.0, 4, 20, 0.1) == pytest.approx(0.1)
    assert lr_at(12, 1.0, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    values = [lr_at(s, 1.0, 4, 20, 0.1) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_warmup_and_all_warmup() -> None:
    assert lr_at(1, 2.0, 0, 10, 0.0) < 2.0
    assert lr_at(10, 2.0, 10, 10, 0.0) == 2.0


def test_schedule_keeps_group_ratios() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]], "lr": 0.2}, {"params": [params[1]], "lr": 0.02}], lr=0.2)
    schedule = LRSchedule(optimizer, peak=0.2, warmup_steps=2, total_steps=10, min_lr=0.0)
    assert schedule.apply(1) == pytest.approx(0.1)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1, 0.01])
