"""`Segment`: the piece of one logical tensor that a rank holds.

Every engine ends up giving each rank a contiguous range ``[lo, hi)`` of the row-major flattening of each
logical tensor (possibly empty). A `Segment` names that range; update rules and tensor-wide operations see
nothing else about the distribution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Flat range ``[lo, hi)`` of logical tensor number ``index`` (of logical shape ``shape``) held locally.

    ``index`` is the tensor's position in the step's ordering, identical on every rank.
    """

    index: int
    shape: tuple[int, ...]
    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi <= self.numel:
            raise ValueError(
                f"segment [{self.lo}, {self.hi}) of tensor {self.index} is outside its {self.numel} elements"
            )

    @property
    def numel(self) -> int:
        """Elements of the whole logical tensor."""
        return math.prod(self.shape)

    @property
    def length(self) -> int:
        """Elements held locally."""
        return self.hi - self.lo

    @property
    def is_whole(self) -> bool:
        """True when this rank holds the entire tensor (then tensor-wide operations are local)."""
        return self.lo == 0 and self.hi == self.numel

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The 2-D view used by the matrix path: ``(shape[0], prod(shape[1:]))``; needs ``ndim >= 2``."""
        if len(self.shape) < 2:
            raise ValueError(f"tensor {self.index} of shape {self.shape} has no matrix view (ndim < 2)")
        return self.shape[0], math.prod(self.shape[1:])

    @classmethod
    def whole(cls, index: int, shape: tuple[int, ...]) -> "Segment":
        """The segment of a rank holding all of tensor ``index``."""
        return cls(index, tuple(shape), 0, math.prod(shape))
