"""`Segment`: the piece of one logical tensor that a rank holds.

Nearly every engine gives each rank a contiguous range ``[lo, hi)`` of the row-major flattening of each logical
tensor (possibly empty). Megatron's tensor parallelism also splits matrices by columns (``RowParallelLinear``);
such a piece is a contiguous range of the row-major flattening of a **column block** ``[c0, c1)`` of the
tensor's matrix view, so a `Segment` may name a block too. Update rules and tensor-wide operations see nothing
else about the distribution; elementwise rules never look at the geometry at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Flat range ``[lo, hi)`` of logical tensor number ``index`` (of logical shape ``shape``) held locally.

    ``index`` is the tensor's position in the step's ordering, identical on every rank. ``block``: ``None``
    (the default) when ``[lo, hi)`` is a range of the whole tensor's row-major flattening; ``(c0, c1)`` when it
    is a range of the row-major flattening of columns ``[c0, c1)`` of the ``matrix_shape`` view (the
    ``rows × (c1 - c0)`` sub-matrix). A block spanning every column is stored as ``None``.
    """

    index: int
    shape: tuple[int, ...]
    lo: int
    hi: int
    block: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.block is not None:
            c0, c1 = (int(c) for c in self.block)
            cols = self.matrix_shape[1]
            if not 0 <= c0 < c1 <= cols:
                raise ValueError(f"column block [{c0}, {c1}) of tensor {self.index} is outside its {cols} columns")
            object.__setattr__(self, "block", None if (c0, c1) == (0, cols) else (c0, c1))
        if not 0 <= self.lo <= self.hi <= self.extent:
            raise ValueError(
                f"segment [{self.lo}, {self.hi}) of tensor {self.index} is outside its {self.extent} elements"
                + ("" if self.block is None else f" (column block {self.block})")
            )

    @property
    def numel(self) -> int:
        """Elements of the whole logical tensor."""
        return math.prod(self.shape)

    @property
    def extent(self) -> int:
        """Elements of the range ``[lo, hi)`` indexes into: the column block, or the whole tensor."""
        if self.block is None:
            return self.numel
        return self.matrix_shape[0] * (self.block[1] - self.block[0])

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

    def columns(self, cols: int) -> tuple[int, int]:
        """``(c0, width)``: the first column and the width of the block ``[lo, hi)`` indexes into, for a matrix
        view with ``cols`` columns (``(0, cols)`` for a contiguous segment)."""
        if self.block is None:
            return 0, cols
        return self.block[0], self.block[1] - self.block[0]

    @classmethod
    def whole(cls, index: int, shape: tuple[int, ...]) -> "Segment":
        """The segment of a rank holding all of tensor ``index``."""
        return cls(index, tuple(shape), 0, math.prod(shape))
