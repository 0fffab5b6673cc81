"""Geometry of the orthogonalizer's data movement: flat ranges of a row-major matrix against rectangles.

A rank holds a flat range ``[lo, hi)`` of a ``(rows, cols)`` matrix, or of one of its column blocks
(`Span`); the rank computing on it wants a rectangle (the whole matrix in gathered mode, a row or column block
in sharded mode). `runs` splits the intersection into at most three rectangles in flat order, so sender and
receiver walk the same elements in the same order without exchanging indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """Rectangle ``[r0, r1) × [c0, c1)`` of a matrix."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    @property
    def numel(self) -> int:
        return (self.r1 - self.r0) * (self.c1 - self.c0)


def runs(lo: int, hi: int, cols: int, region: Region) -> list[Region]:
    """The elements of flat range ``[lo, hi)`` of a ``(·, cols)`` matrix that lie in ``region``, as at most
    three rectangles (partial first row, full middle rows, partial last row) listed in flat order."""
    if lo >= hi:
        return []
    first, last = lo // cols, (hi - 1) // cols
    pieces = [(first, first + 1, lo - first * cols, min(cols, hi - first * cols))]
    if last > first:
        pieces.append((first + 1, last, 0, cols))
        pieces.append((last, last + 1, 0, hi - last * cols))
    out = []
    for r0, r1, c0, c1 in pieces:
        r0, r1, c0, c1 = max(r0, region.r0), min(r1, region.r1), max(c0, region.c0), min(c1, region.c1)
        if r0 < r1 and c0 < c1:
            out.append(Region(r0, r1, c0, c1))
    return out


@dataclass(frozen=True)
class Span:
    """A rank's piece of a matrix: flat range ``[lo, hi)`` of the row-major flattening of columns
    ``[c0, c0 + width)`` (a contiguous range of the whole matrix when ``c0 == 0`` and ``width`` is all columns)."""

    lo: int
    hi: int
    c0: int
    width: int

    @property
    def length(self) -> int:
        return self.hi - self.lo

    def runs(self, region: Region) -> list[Region]:
        """`runs` of this piece inside ``region``, in matrix coordinates and the piece's flat order."""
        if self.c0 == 0:
            return runs(self.lo, self.hi, self.width, region)
        local = Region(region.r0, region.r1, max(region.c0 - self.c0, 0), min(region.c1 - self.c0, self.width))
        if local.c0 >= local.c1:
            return []
        return [_shift(rect, self.c0) for rect in runs(self.lo, self.hi, self.width, local)]

    def view(self, piece: torch.Tensor, rect: Region) -> torch.Tensor:
        """View of ``rect`` (from `Span.runs`) inside the 1-D ``piece`` holding this span."""
        return flat_view(piece, self.lo, self.width, _shift(rect, -self.c0) if self.c0 else rect)


def _shift(rect: Region, columns: int) -> Region:
    return Region(rect.r0, rect.r1, rect.c0 + columns, rect.c1 + columns)


def flat_view(piece: torch.Tensor, lo: int, cols: int, rect: Region) -> torch.Tensor:
    """View of ``rect`` inside a 1-D piece holding flat range ``[lo, ·)`` (``rect`` from `runs`)."""
    start = rect.r0 * cols - lo
    if rect.r1 - rect.r0 == 1:
        return piece[start + rect.c0 : start + rect.c1].view(1, -1)
    return piece[start : start + (rect.r1 - rect.r0) * cols].view(-1, cols)[:, rect.c0 : rect.c1]


def block_view(block: torch.Tensor, region: Region, rect: Region) -> torch.Tensor:
    """View of ``rect`` inside the 2-D buffer of ``region``."""
    return block[rect.r0 - region.r0 : rect.r1 - region.r0, rect.c0 - region.c0 : rect.c1 - region.c0]


def even_blocks(rows: int, cols: int, world_size: int) -> dict[int, Region]:
    """Sharded-mode regions: even contiguous blocks (first ranks one longer) along the long side of NS's
    wide orientation: row blocks when ``rows > cols``, else column blocks. Every rank gets one (maybe empty)."""
    tall = rows > cols
    length = rows if tall else cols
    blocks, start = {}, 0
    for rank in range(world_size):
        size = length // world_size + (rank < length % world_size)
        blocks[rank] = Region(start, start + size, 0, cols) if tall else Region(0, rows, start, start + size)
        start += size
    return blocks
