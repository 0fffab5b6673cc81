"""Whole-tensor Frobenius norm and MARS's unit-norm clip, through a `TensorSum` request."""
from __future__ import annotations

import math
from typing import Any, Generator

import torch

from mgup_dist.rules.requests import Request, TensorSum
from mgup_dist.shard.segment import Segment


def frobenius_norm(local: torch.Tensor, segment: Segment) -> Generator[Request, Any, float]:
    """‖x‖_F of the whole logical tensor from the local segment (sum of squares accumulated in float64)."""
    total = yield TensorSum(segment, torch.sum(local * local, dtype=torch.float64))
    return math.sqrt(float(total))


def clip_to_unit_norm(local: torch.Tensor, segment: Segment) -> Generator[Request, Any, float]:
    """Divides ``local`` in place by the tensor's norm when that norm is strictly above 1; returns the norm."""
    norm = yield from frobenius_norm(local, segment)
    if norm > 1:
        local.div_(norm)
    return norm
