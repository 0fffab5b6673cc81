"""`LocalOps`: tensor-wide operations when every segment is the whole tensor (a single process)."""
from __future__ import annotations

from typing import Sequence

import torch

from mgup_dist.ops.select import request_mask
from mgup_dist.rules.newton_schulz import newton_schulz
from mgup_dist.rules.requests import Orthogonalize, PackedMask, TensorSum, TopKMask


def _require_whole(request: TensorSum | TopKMask | Orthogonalize) -> None:
    if not request.segment.is_whole:
        raise ValueError(
            f"LocalOps got a partial segment {request.segment}; sharded layouts need collective TensorOps"
        )


class LocalOps:
    """Resolves requests without communication. Every request's segment must be whole."""

    def tensor_sums(self, requests: Sequence[TensorSum]) -> list[torch.Tensor]:
        for r in requests:
            _require_whole(r)
        return [r.value for r in requests]

    def topk_masks(self, requests: Sequence[TopKMask]) -> list[torch.Tensor | PackedMask]:
        for r in requests:
            _require_whole(r)
        return [request_mask(r) for r in requests]

    def orthogonalize(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        out = []
        for r in requests:
            _require_whole(r)
            matrix = r.local.view(r.rows, r.cols)
            out.append(newton_schulz(matrix, r.steps, r.dtype).view(-1))
        return out

    def settle(self) -> None:
        """Nothing is ever pending: `topk_masks` raises at once."""
