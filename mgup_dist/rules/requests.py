"""Requests an update rule yields when it needs whole-tensor information.

A rule is a generator over one tensor's local segment. At each point where the math needs the whole logical
tensor it ``yield``s one of these requests and receives the answer. The driver (`mgup_dist.rules.driver`)
collects the requests of all tensors in a round and hands them, batched by kind, to a `TensorOps`
implementation: local for a single process, collective for a sharded layout.

Contract for rule authors: whether and what a rule yields may depend only on hyperparameters, the segment's
logical shape and earlier answers, never on local data, so every rank issues the same rounds.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mgup_dist.rules.adam_direction import AdamQuotient
from mgup_dist.shard.segment import Segment


@dataclass
class TensorSum:
    """Sum of ``value`` over all segments of the tensor.

    ``value``: 0-d local partial sum, ``torch.float64`` or ``torch.int64``.
    Answer: 0-d tensor of the same dtype holding the global sum (identical on every rank).
    """

    segment: Segment
    value: torch.Tensor


@dataclass(frozen=True)
class ScoreProduct:
    """Scores given by their factors: ``direction ⊙ grad`` rounded once to float32 (1-D tensors of one length,
    any float dtypes, converted to float32 first). ``direction`` may be an `AdamQuotient` not formed yet.
    Implementations that can read the factors (the native CPU selection) never write the scores and may form
    the quotient in their first pass; the rest call `TopKMask.score_tensor`, which forms the direction and the
    scores (in ``buffer``, a float32 tensor of the factors' length, when given)."""

    direction: torch.Tensor | AdamQuotient
    grad: torch.Tensor
    buffer: torch.Tensor | None = None

    def direction_tensor(self) -> torch.Tensor:
        """The direction as a tensor (an `AdamQuotient` is formed first)."""
        return self.direction.form() if isinstance(self.direction, AdamQuotient) else self.direction

    def materialize(self) -> torch.Tensor:
        """The float32 scores (in ``buffer`` when given)."""
        direction = self.direction_tensor()
        if direction.dtype == torch.float32 and self.grad.dtype == torch.float32:
            return torch.mul(direction, self.grad, out=self.buffer)
        return torch.mul(direction.float(), self.grad.float(), out=self.buffer)


@dataclass(frozen=True)
class PackedMask:
    """A 1-D mask of ``numel`` elements, one bit each: element ``i`` is bit ``i % 8`` of byte ``i // 8`` of the
    first ``(numel + 7) // 8`` bytes of ``storage``, a 1-D contiguous ``torch.uint8`` or ``torch.bool`` tensor of at
    least that many bytes (e.g. the bool buffer the bits were written into; the bits past ``numel`` are
    unspecified). Kernels read ``storage``'s memory directly; `bits` is the uint8 view."""

    storage: torch.Tensor
    numel: int

    @property
    def bits(self) -> torch.Tensor:
        """The ``(numel + 7) // 8`` bytes of bits as a ``torch.uint8`` view of ``storage``."""
        return self.storage.view(torch.uint8)[: (self.numel + 7) // 8]

    def unpack(self) -> torch.Tensor:
        """The mask as a 1-D ``torch.bool`` tensor of ``numel`` elements."""
        bits = self.bits
        shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
        return ((bits.unsqueeze(1) >> shifts) & 1).view(-1)[: self.numel].bool()


@dataclass
class TopKMask:
    """Membership of each local element in the tensor's top-k scores.

    ``scores``: 1-D ``torch.float32`` local segment (``segment.length`` elements), or a `ScoreProduct` of two
    such segments; ``-0.0`` ties with ``+0.0``.
    ``k``: ``0 <= k <= segment.numel``.
    ``out``: optional 1-D ``torch.bool`` tensor of the same length that the answer may be written into (an
    implementation may return a fresh tensor instead); the asker must not read it otherwise.
    ``packed``: the asker also takes a `PackedMask` answer (whose bits may live in ``out``'s storage).
    Answer: 1-D ``torch.bool`` of the same length (or, when ``packed``, possibly a `PackedMask` of it), True for
    the ``k`` largest scores of the whole logical tensor, ordering by score descending then global flat index
    ascending. Non-finite scores raise `NonFiniteScoresError`.
    """

    segment: Segment
    scores: torch.Tensor | ScoreProduct
    k: int
    out: torch.Tensor | None = None
    packed: bool = False

    def score_tensor(self) -> torch.Tensor:
        """The scores as a float32 tensor, forming a `ScoreProduct` (once; ``scores`` then holds the result)."""
        if isinstance(self.scores, ScoreProduct):
            self.scores = self.scores.materialize()
        return self.scores


@dataclass
class Orthogonalize:
    """Newton–Schulz (NS5) of the tensor's ``(rows, cols)`` matrix view.

    ``local``: 1-D local segment of the row-major flattening of that matrix (any float dtype).
    Answer: 1-D local segment of ``newton_schulz(matrix, steps, dtype)``, in ``dtype``.
    """

    segment: Segment
    local: torch.Tensor
    rows: int
    cols: int
    steps: int
    dtype: torch.dtype


Request = TensorSum | TopKMask | Orthogonalize


class NonFiniteScoresError(FloatingPointError):
    """A top-k mask was requested over scores containing NaN or infinity (from non-finite gradients)."""
