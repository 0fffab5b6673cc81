"""`DistributedOrthogonalizer`: Newton–Schulz (NS5) of matrices whose flat segments are spread over ranks.

Called by every rank of the group with the same list of `Orthogonalize` requests (same order, shapes, steps
and dtypes; each rank's own local pieces). Each request's answer is this rank's slice of
``newton_schulz(matrix, steps, dtype)``.

**Gathered mode** (the default; bitwise equal to `LocalOps`):

1. one small all-gather of every rank's ``(lo, hi, c0, c1, rows, cols, steps, dtype)`` per request (``[c0, c1)``:
   the column block a `Segment` with a ``block`` indexes into, all columns otherwise), so all ranks know the
   whole layout of the round and check it (pieces must tile each matrix exactly, metadata must agree);
2. owners from `balanced_owners` over `ns_cost` (times steps), computed identically on every rank. A matrix
   some rank holds whole is fixed to that rank: it never moves and costs no bytes;
3. per NS dtype, one ``all_to_all`` carrying every other piece, already cast to the NS dtype (an elementwise
   cast, so the owner's matrix is bitwise the cast of the full matrix), to its owner, which reassembles the
   ``(rows, cols)`` matrix and runs `newton_schulz` once: no matrix is computed on two ranks;
4. per NS dtype, one ``all_to_all`` returning each rank its slice of the result.

**Sharded (Gram) mode**, for a matrix with more than ``gather_max_numel`` elements that no rank holds whole:
the matrix is redistributed (in the same ``all_to_all`` as step 3) into even contiguous blocks along the
long side of NS's wide orientation ``X`` (rows of the matrix when ``rows > cols``, else columns), one block
per rank. Then ``‖X‖_F`` and, each iteration, the small-side Gram matrix ``A = X·Xᵀ`` are all-reduced (summed
over blocks, batched over all such matrices of the call), after which ``X_j ← a·X_j + B·X_j`` is local to
each block ``X_j``. Results return in the step-4 ``all_to_all``. The arithmetic has the form of
`newton_schulz` (same coefficients, eps and update), but the Gram matrix and the norm are sums that cross
ranks: partial Grams are accumulated in float32 and the cross-rank sum is rounded to the NS dtype once (the
rounding of a single ``ns_dtype`` matmul with float32 accumulation), so results equal the gathered mode up
to float32 summation order: about 1e-6 relative in float32. In bfloat16 that order rarely changes a rounded
Gram entry, but once one flips the difference spreads: 0.9–1.3e-2 relative on GPT-2-small matrices split
over 2 ranks, below bf16 NS's own distance from float32 NS (~2.2e-2).

Sharded mode trades memory for bytes: it all-reduces ``steps·min(m,n)²`` float32 values against at most
``2·m·n`` NS-dtype values moved by gathering, so it pays off in bytes only for very elongated matrices; its
use is a matrix too large to hold whole on one rank.

All communication goes through `Collectives`, whose ``stats`` count calls and bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mgup_dist.rules.newton_schulz import NS_COEFFICIENTS, NS_EPS, newton_schulz, symmetric_product
from mgup_dist.rules.requests import Orthogonalize
from mgup_dist.shard.collectives import Collectives
from mgup_dist.shard.layout import ShardLayout, tiling_problem
from mgup_dist.shard.planner import balanced_owners, ns_cost
from mgup_dist.shard.regions import Region, Span, block_view, even_blocks
from mgup_dist.shard.segment import Segment

# Floating dtypes a request may name, coded by position in the metadata exchange.
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FIELDS = 8  # lo, hi, c0, c1, rows, cols, steps, dtype code


@dataclass
class _Job:
    """One non-empty matrix of the call: every rank's piece, and the region each computing rank gets."""

    position: int
    request: Orthogonalize
    spans: list[Span]
    targets: dict[int, Region]
    holder: int | None  # the rank holding it whole, if any
    sharded: bool

    @property
    def cols(self) -> int:
        return self.request.cols

    def moves(self) -> bool:
        """Whether any element lies outside the region of the rank holding it (then bytes must move)."""
        if not self.sharded:
            return self.holder is None
        return any(
            sum(r.numel for r in span.runs(self.targets[rank])) != span.length
            for rank, span in enumerate(self.spans)
        )


def _validate(requests: Sequence[Orthogonalize]) -> None:
    for i, r in enumerate(requests):
        if not isinstance(r, Orthogonalize):
            raise TypeError(f"request {i} is a {type(r).__name__}, expected Orthogonalize")
        if r.dtype not in _DTYPES:
            raise TypeError(f"request {i} (tensor {r.segment.index}): NS dtype {r.dtype} is not one of {_DTYPES}")
        if not isinstance(r.local, torch.Tensor) or not r.local.is_floating_point() or r.local.ndim != 1:
            raise TypeError(f"request {i} (tensor {r.segment.index}): local piece must be a 1-D float tensor")
        if r.local.numel() != r.segment.length:
            raise ValueError(
                f"request {i} (tensor {r.segment.index}): local piece has {r.local.numel()} elements, "
                f"segment [{r.segment.lo}, {r.segment.hi}) has {r.segment.length}"
            )
        if r.rows < 0 or r.cols < 0 or r.rows * r.cols != r.segment.numel:
            raise ValueError(
                f"request {i} (tensor {r.segment.index}): ({r.rows}, {r.cols}) is not a matrix view of shape "
                f"{r.segment.shape}"
            )
        if isinstance(r.steps, bool) or not isinstance(r.steps, int) or r.steps < 0:
            raise ValueError(
                f"request {i} (tensor {r.segment.index}): steps must be a non-negative int, got {r.steps!r}"
            )


def _check_agreement(requests: Sequence[Orthogonalize], table: torch.Tensor) -> None:
    """``table``: ``(world, n, 8)`` metadata of all ranks. Raises `ValueError` (on every rank alike) unless
    all ranks describe the same matrices and each matrix's pieces tile it exactly."""
    shared = table[..., 4:]
    disagree = (shared != shared[:1]).any(dim=2).any(dim=0)
    if disagree.any():
        i = int(disagree.nonzero()[0])
        raise ValueError(f"request {i}: ranks disagree on (rows, cols, steps, dtype): {shared[:, i].tolist()}")
    blocked = ((table[..., 2] != 0) | (table[..., 3] != table[..., 5])).any(dim=0)
    for i in blocked.nonzero().view(-1).tolist():
        rows, cols = requests[i].rows, requests[i].cols
        problem = tiling_problem(rows, cols, [(lo, hi, c0, c1) for lo, hi, c0, c1 in table[:, i, :4].tolist()])
        if problem:
            raise ValueError(f"request {i} (tensor {requests[i].segment.index}): {problem}")
    table = table[:, ~blocked]
    lo, hi = table[..., 0], table[..., 1]
    numel = table[0, :, 4] * table[0, :, 5]
    empty = hi == lo
    lo_key = torch.where(empty, numel, lo)
    order = lo_key.argsort(dim=0, stable=True)
    lo_sorted, hi_sorted = lo_key.gather(0, order), torch.where(empty, numel, hi).gather(0, order)
    overlap = (hi_sorted[:-1] > lo_sorted[1:]).any(dim=0)
    bad = overlap | ((hi - lo).sum(dim=0) != numel)
    if bad.any():
        j = int(bad.nonzero()[0])
        i = int((~blocked).nonzero()[j])
        raise ValueError(
            f"request {i} (tensor {requests[i].segment.index}, {int(numel[j])} elements): ranks' ranges "
            f"{[tuple(x) for x in table[:, j, :2].tolist()]} do not cover it exactly once"
        )


class DistributedOrthogonalizer:
    """Resolves a round's `Orthogonalize` requests across the ranks of ``comm`` (see the module docstring).

    ``gather_max_numel``: matrices with more elements than this (and held whole by no rank) use the sharded
    Gram mode; ``None`` gathers every matrix. Counters: ``ns_calls`` (whole-matrix `newton_schulz` runs on
    this rank), ``sharded_calls`` (sharded matrices this rank iterated on), ``last_owners`` (per request of
    the latest call: the computing rank in gathered mode, ``None`` for sharded or empty matrices).
    ``layout``: every rank's segments (`_exchange_metadata`); with it, each distinct round (the requests'
    segments, shapes, steps and dtypes) is planned and checked once, and its plan reused.
    """

    def __init__(
        self, comm: Collectives, gather_max_numel: int | None = None, layout: ShardLayout | None = None
    ) -> None:
        if gather_max_numel is not None and (
            isinstance(gather_max_numel, bool) or not isinstance(gather_max_numel, int) or gather_max_numel < 0
        ):
            raise ValueError(f"gather_max_numel must be None or a non-negative int, got {gather_max_numel!r}")
        self.comm = comm
        self.gather_max_numel = gather_max_numel
        self.layout = layout
        self.ns_calls = 0
        self.sharded_calls = 0
        self.last_owners: list[int | None] = []
        self._plans: dict[tuple, tuple[list[tuple], list[int | None]]] = {}

    def __call__(self, requests: Sequence[Orthogonalize]) -> list[torch.Tensor]:
        requests = list(requests)
        _validate(requests)
        answers = [torch.empty(0, dtype=r.dtype, device=r.local.device) for r in requests]
        self.last_owners = [None] * len(requests)
        if not requests:
            return answers
        jobs = self._jobs(requests)
        blocks: dict[int, torch.Tensor] = {}
        for group in self._dtype_groups(jobs):
            blocks.update(self._to_regions(group))
        results = self._compute(jobs, blocks)
        for group in self._dtype_groups(jobs):
            for position, answer in self._from_regions(group, results).items():
                answers[position] = answer
        return answers

    def _jobs(self, requests: list[Orthogonalize]) -> list[_Job]:
        """The round's checked plan. With a ``layout`` it depends only on each request's segment and matrix
        settings, so it is made once per distinct round and reused (with this round's requests)."""
        if self.layout is None:
            return self._plan(requests, self._exchange_metadata(requests))
        key = tuple((r.segment, r.rows, r.cols, r.steps, r.dtype) for r in requests)
        cached = self._plans.get(key)
        if cached is None:
            jobs = self._plan(requests, self._exchange_metadata(requests))
            self._plans[key] = cached = ([(j.position, j.spans, j.targets, j.holder, j.sharded) for j in jobs],
                                         self.last_owners)
        plan, self.last_owners = cached[0], list(cached[1])
        return [_Job(position, requests[position], *rest) for position, *rest in plan]

    def _exchange_metadata(self, requests: list[Orthogonalize]) -> torch.Tensor:
        """``(world, n, 8)`` int64 table of every rank's ``(lo, hi, c0, c1, rows, cols, steps, dtype)``; checked.

        With a ``layout`` (global knowledge every rank shares, e.g. our ZeRO engine's) the table is built
        locally and nothing is sent; otherwise one small all-gather per round."""
        def row(r: Orthogonalize, segment: Segment) -> tuple[int, ...]:
            c0, width = segment.columns(r.cols)
            return (segment.lo, segment.hi, c0, c0 + width, r.rows, r.cols, r.steps, _DTYPES.index(r.dtype))

        if self.layout is not None:
            table = torch.tensor(
                [[row(r, self.layout.segment(rank, r.segment.index)) for r in requests]
                 for rank in range(self.comm.world_size)],
                dtype=torch.int64,
            )
            mine = [row(r, r.segment) for r in requests]
            if table[self.comm.rank].tolist() != [list(x) for x in mine]:
                raise ValueError("the requests' segments differ from the layout given to DistributedOrthogonalizer")
        else:
            local = torch.tensor(
                [row(r, r.segment) for r in requests], dtype=torch.int64, device=requests[0].local.device
            ).view(-1)
            table = self.comm.all_gather_scalars(local) if self.comm.world_size > 1 else local.unsqueeze(0)
            table = table.view(self.comm.world_size, len(requests), _FIELDS).cpu()
        _check_agreement(requests, table)
        return table

    def _plan(self, requests: list[Orthogonalize], table: torch.Tensor) -> list[_Job]:
        """Jobs for the non-empty matrices, with gathered-mode owners from the balanced plan."""
        world = self.comm.world_size
        all_pieces = table[..., :4].permute(1, 0, 2).tolist()
        jobs, costs, fixed = [], [], {}
        for position, (request, pieces) in enumerate(zip(requests, all_pieces)):
            numel = request.segment.numel
            if numel == 0:
                continue
            spans = [Span(lo, hi, c0, c1 - c0) for lo, hi, c0, c1 in pieces]
            holder = next((rank for rank, span in enumerate(spans) if span.length == numel), None)
            sharded = holder is None and self.gather_max_numel is not None and numel > self.gather_max_numel
            targets = even_blocks(request.rows, request.cols, world) if sharded else {}
            jobs.append(_Job(position, request, spans, targets, holder, sharded))
            if not sharded:
                if holder is not None:
                    fixed[len(costs)] = holder
                costs.append(ns_cost(request.rows, request.cols) * max(request.steps, 1))
        owners = iter(balanced_owners(costs, world, fixed))
        for job in jobs:
            if not job.sharded:
                owner = next(owners)
                job.targets = {owner: Region(0, job.request.rows, 0, job.cols)}
                self.last_owners[job.position] = owner
        return jobs

    @staticmethod
    def _dtype_groups(jobs: list[_Job]) -> list[list[_Job]]:
        dtypes = dict.fromkeys(job.request.dtype for job in jobs)
        return [[job for job in jobs if job.request.dtype == dtype] for dtype in dtypes]

    def _all_to_all(
        self, outgoing: list[list[torch.Tensor]], incoming: list[int], dtype: torch.dtype, device: torch.device
    ) -> list[torch.Tensor]:
        """Sends the concatenation of ``outgoing[d]`` to every rank ``d``; returns what each rank sent here."""
        send_splits = [sum(t.numel() for t in chunks) for chunks in outgoing]
        pieces = [t.reshape(-1) for chunks in outgoing for t in chunks]
        flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=dtype, device=device)
        return list(self.comm.all_to_all(flat, send_splits, incoming).split(incoming))

    def _to_regions(self, group: list[_Job]) -> dict[int, torch.Tensor]:
        """Moves one NS-dtype group's pieces to the ranks computing on them (one ``all_to_all``, skipped on
        every rank when nothing moves); returns this rank's 2-D region buffers by request position."""
        me, world = self.comm.rank, self.comm.world_size
        dtype = group[0].request.dtype
        cast = {job.position: job.request.local.to(dtype).contiguous() for job in group if job.holder is None}
        outgoing: list[list[torch.Tensor]] = [[] for _ in range(world)]
        incoming = [0] * world
        for job in group:
            if job.holder is not None:
                continue
            span = job.spans[me]
            for dest, region in job.targets.items():
                if dest != me:
                    outgoing[dest].extend(span.view(cast[job.position], rect) for rect in span.runs(region))
            if me in job.targets:
                for src, src_span in enumerate(job.spans):
                    if src != me:
                        incoming[src] += sum(r.numel for r in src_span.runs(job.targets[me]))
        received = [torch.empty(0)] * world
        if any(job.moves() for job in group):
            received = self._all_to_all(outgoing, incoming, dtype, group[0].request.local.device)
        cursors = [0] * world
        blocks = {}
        for job in group:
            region = job.targets.get(me)
            if region is None:
                continue
            if job.holder == me:
                blocks[job.position] = job.request.local.reshape(job.request.rows, job.cols)
                continue
            block = torch.empty(region.shape, dtype=dtype, device=job.request.local.device)
            for src, span in enumerate(job.spans):
                for rect in span.runs(region):
                    if src == me:
                        data = span.view(cast[job.position], rect)
                    else:
                        data = received[src][cursors[src] : cursors[src] + rect.numel]
                        cursors[src] += rect.numel
                    block_view(block, region, rect).copy_(data.view(rect.shape))
            blocks[job.position] = block
        return blocks

    def _compute(self, jobs: list[_Job], blocks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """NS on this rank's regions: whole matrices it owns, then all sharded matrices together."""
        results = {}
        for job in jobs:
            if not job.sharded and job.position in blocks:
                results[job.position] = newton_schulz(blocks[job.position], job.request.steps, job.request.dtype)
                self.ns_calls += 1
        sharded = [job for job in jobs if job.sharded]
        if sharded:
            outs = gram_newton_schulz(
                self.comm,
                [blocks[job.position] for job in sharded],
                [job.request.rows > job.cols for job in sharded],
                [job.request.steps for job in sharded],
            )
            results.update((job.position, out) for job, out in zip(sharded, outs))
            self.sharded_calls += len(sharded)
        return results

    def _from_regions(self, group: list[_Job], results: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Returns each rank its slice of one NS-dtype group's results (one ``all_to_all``, skipped on every
        rank when nothing moves); gives this rank's 1-D answers by request position."""
        me, world = self.comm.rank, self.comm.world_size
        outgoing: list[list[torch.Tensor]] = [[] for _ in range(world)]
        incoming = [0] * world
        for job in group:
            if job.holder is not None:
                continue
            region = job.targets.get(me)
            if region is not None:
                for dest, span in enumerate(job.spans):
                    if dest != me:
                        pieces = span.runs(region)
                        outgoing[dest].extend(block_view(results[job.position], region, rect) for rect in pieces)
            span = job.spans[me]
            for src, src_region in job.targets.items():
                if src != me:
                    incoming[src] += sum(r.numel for r in span.runs(src_region))
        dtype = group[0].request.dtype
        received = [torch.empty(0)] * world
        if any(job.moves() for job in group):
            received = self._all_to_all(outgoing, incoming, dtype, group[0].request.local.device)
        cursors = [0] * world
        answers = {}
        for job in group:
            if job.holder is not None:
                if job.holder == me:
                    answers[job.position] = results[job.position].view(-1)
                continue
            span = job.spans[me]
            answer = torch.empty(span.length, dtype=dtype, device=job.request.local.device)
            for src, region in job.targets.items():
                for rect in span.runs(region):
                    if src == me:
                        data = block_view(results[job.position], region, rect)
                    else:
                        data = received[src][cursors[src] : cursors[src] + rect.numel].view(rect.shape)
                        cursors[src] += rect.numel
                    span.view(answer, rect).copy_(data)
            answers[job.position] = answer
        return answers


def gram_newton_schulz(
    comm: Collectives, blocks: Sequence[torch.Tensor], tall: Sequence[bool], steps: Sequence[int]
) -> list[torch.Tensor]:
    """NS5 of matrices held as blocks along the long side of their wide orientation, one block per rank.

    Every rank calls it with its block of each matrix (2-D, in the matrix's own orientation and its NS
    dtype: rows ``[r_j, r_j')`` of a tall matrix, ``tall[k]`` True; columns ``[c_j, c_j')`` otherwise; blocks
    may be empty). Returns this rank's block of NS5 of each matrix, same shape and dtype. Collectives: one
    float32 all-reduce of the squared norms, then one per iteration of the Gram matrices of the matrices
    still iterating; the same on every rank.
    """
    a, b, c = NS_COEFFICIENTS
    xs = [block.T if is_tall else block for block, is_tall in zip(blocks, tall)]
    squares = torch.stack([x.float().square().sum() for x in xs])
    norms = comm.all_reduce(squares).sqrt()
    xs = [x / (norm.to(x.dtype) + NS_EPS) for x, norm in zip(xs, norms)]
    for iteration in range(max(steps, default=0)):
        active = [k for k, n in enumerate(steps) if n > iteration]
        partial = [_gram(xs[k].float()) for k in active]
        summed = comm.all_reduce(torch.cat([g.reshape(-1) for g in partial]))
        for k, gram in zip(active, summed.split([g.numel() for g in partial])):
            small = xs[k].shape[0]
            gram = gram.view(small, small).to(xs[k].dtype)
            poly = b * gram + c * (gram @ gram)  # the summed Gram's mirror entries may differ in their last bits
            xs[k] = a * xs[k] + poly @ xs[k]
    return [x.T if is_tall else x for x, is_tall in zip(xs, tall)]


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` of a 2-D block (`symmetric_product`)."""
    return symmetric_product(x, x, x.new_empty(x.shape[0], x.shape[0]))
