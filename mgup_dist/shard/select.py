"""Exact top-k masks over tensors split across ranks: radix select with batched histogram all-reduces.

`topk_masks(comm, requests)` answers every `TopKMask` request of one round (collective: all ranks call it
with the same requests in the same order, each passing its own segments). The answer equals
`mgup_dist.ops.select.topk_mask` on the gathered scores, bit for bit: the ``k`` largest scores, ties at the
k-th value going to the lowest global flat indices, ``-0.0`` tying with ``+0.0``.

Method (spec §6, "Exact distributed MGUP top-k"):

1. Scores map to an order-preserving 32-bit key (`order_keys`): ``-0.0`` is canonicalised to ``+0.0`` by
   adding ``0.0``, then the float's bits have all non-sign bits inverted when the sign bit is set, compared
   as signed int32 (the spec's unsigned key minus 2**31).
2. The k-th largest key is found one byte at a time, most significant first: each pass histograms the next
   byte of the candidate keys (those matching the prefix found so far) into 256 bins, all-reduces the
   histograms of **all requests of the round in one call**, and picks the bin holding the k-th largest.
   Four passes of 256 bins rather than two of 65536: the reduced bytes stay ~1 KB per request and pass (not
   256 KB), and the candidate set, compacted after every pass, shrinks fast. A request finishes early when
   the chosen bin is taken whole (no tie straddles the cut).
3. The mask is computed on the float scores: True above the threshold value ``T``; when the cut splits the
   scores equal to ``T``, the remaining ``r`` slots go to the ties with the lowest global flat indices, from
   an exclusive prefix count of ties over the ranks in flat-offset order (one all-gather of ``(lo, ties)``
   pairs, batched over the requests). Segments with a column ``block`` (tensor parallelism's column split)
   interleave with the other ranks' row by row, so for them that gather carries ``(lo, c0, width)`` and the
   ties of every row of the matrix view instead (`_block_quotas`; a second all-gather, only when such a
   tensor's ties straddle the cut). A tensor's segments must all have blocks or all have none.

The first all-reduce also carries, per request, a non-finite flag (so NaN/inf raises `NonFiniteScoresError`
on every rank at the same point, without desynchronising collectives) and a "held whole" flag. A rank cannot
tell from an empty segment whether another rank holds the whole tensor, so every selecting request has bins
in that first all-reduce; the holder sends zeros there, having answered before it with the local selection
(`topk_mask_of_product` straight from a `ScoreProduct`'s factors, so the scores are never formed), which
also tells it whether the scores are finite; once the flags are known every rank drops the request. A split
tensor's flag comes from its top-byte histogram: non-finite keys fall in the two outer bins only, so the
scores are scanned (one min/max reduction) only when those hold a key. Collective volume is independent of k and of tensor sizes: per
round of ``R`` requests, at most 4 all-reduces (the first of ``2·R + 256·(requests with 0 < k < numel)``
counts, the others of ``256·(split requests still open)``; int32 counts, int64 once a tensor has 2**31
elements) and at most one all-gather of ``2·(requests whose threshold ties straddle the cut)`` int64 values.

`whole_topk_masks` answers a round whose tensors are each held whole by one rank, as the caller's layout shows
(every rank knows it, so no "held whole" flags are needed): all answers are local, and the only collective, the
non-finite flags' all-reduce, is started and returned as a pending `NonFiniteVerdict` for the caller to settle
before any answer is used (`ShardedOps.settle`, which the rule driver calls after each round).

Local work for split tensors on CPU runs on zero-copy numpy views of the formed scores (torch 2.13's CPU
integer, comparison and masking kernels are several times slower): key, top-byte histogram, one compaction,
then passes over the few candidates left, and one comparison pass for the mask (into the request's ``out``).
A rank forms no scores for a tensor of which it holds nothing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import torch

from mgup_dist.ops.select import locate_ties, request_mask
from mgup_dist.rules.requests import NonFiniteScoresError, PackedMask, ScoreProduct, TopKMask
from mgup_dist.shard.collectives import Collectives, PendingReduction

Values = Union[np.ndarray, torch.Tensor]  # numpy view of a CPU tensor, or the (device) tensor itself

_BINS = 256
_TOP_SHIFT = 24
_KEY_OFFSET = 2**31  # unsigned key = signed key + 2**31
_BLOCK = 1 << 16  # elements per block of the host key pass


def _host(tensor: torch.Tensor) -> Values:
    return tensor.numpy() if tensor.device.type == "cpu" else tensor


def _flip_negative(bits: Values, scratch: Values | None = None) -> Values:
    """In place: inverts the non-sign bits of negative int32 ``bits`` (an involution); ``scratch``: an int32
    buffer of at least ``len(bits)`` elements to use for the sign mask."""
    flip = bits >> 31 if scratch is None else np.right_shift(bits, 31, out=scratch[: len(bits)])
    flip &= 0x7FFFFFFF
    bits ^= flip
    return bits


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys of float32 ``scores`` whose signed order is the scores' order (``-0.0`` equal to ``+0.0``).

    On the host the work goes block by block, so the temporaries stay in cache."""
    scores = scores.detach()
    if scores.device.type != "cpu":
        return _flip_negative((scores + 0.0).view(torch.int32))
    keys = torch.empty(scores.numel(), dtype=torch.int32)
    values, out = scores.numpy(), keys.numpy()
    scratch = np.empty(min(len(values), _BLOCK), dtype=np.int32)
    for start in range(0, len(values), _BLOCK):
        block = out[start : start + _BLOCK]
        np.add(values[start : start + _BLOCK], np.float32(0.0), out=block.view(np.float32))
        _flip_negative(block, scratch)
    return keys


def key_value(key: int) -> float:
    """The float32 value whose `order_keys` key is the signed int ``key``."""
    bits = _flip_negative(np.array([key], dtype=np.int32))
    return float(bits.view(np.float32)[0])


def _key_byte(keys: Values, shift: int) -> Values:
    """Byte ``shift // 8`` of each key as the unsigned key's byte (uint8 on the host, int64 on devices)."""
    if isinstance(keys, np.ndarray):
        byte = shift // 8 if sys.byteorder == "little" else 3 - shift // 8
        digits = keys.view(np.uint8).reshape(-1, 4)[:, byte].copy()
    else:
        digits = (keys >> shift).bitwise_and_(0xFF).long()
    if shift == _TOP_SHIFT:
        digits ^= 0x80  # the signed key's sign bit, as the unsigned key's top bit
    return digits


class _Selection:
    """Radix-select state of one request whose tensor is split over ranks (``0 < k < numel``).

    ``need`` counts the elements still to select among the candidates: the local keys matching the key prefix
    ``low`` found so far (the bits above ``shift + 8``). Once ``done``, the threshold is the value of key
    ``low`` and ``ties`` is None when every score ``>= T`` is selected, else how many of the scores equal to
    ``T`` (the first, in global flat order) are.
    """

    def __init__(self, request: TopKMask) -> None:
        self.request = request
        self.candidates = _host(order_keys(request.scores))
        self.digits: Values | None = None
        self.need = request.k
        self.low = 0
        self.shift = _TOP_SHIFT
        self.ties: int | None = None
        self.done = False
        self._local_ties: int | None = None

    def histogram(self) -> torch.Tensor:
        """Counts of the next key byte over this rank's candidates (256 bins, int64)."""
        self.digits = _key_byte(self.candidates, self.shift)
        digits = torch.from_numpy(self.digits) if isinstance(self.digits, np.ndarray) else self.digits
        return torch.bincount(digits, minlength=_BINS)

    def advance(self, digit: int, above: int, count: int) -> None:
        """Takes the global choice: ``digit``'s bin holds the k-th largest, ``above`` candidates lie in higher
        bins and ``count`` in that bin."""
        self.need -= above
        self.low |= digit << self.shift
        if self.need == count:
            self.done = True
        elif self.shift == 0:
            self.done, self.ties = True, self.need
        else:
            self.candidates = self.candidates[self.digits == digit]
            self.shift -= 8
        self.digits = None
        if self.done:
            self.candidates = self.candidates[:0]

    @property
    def threshold(self) -> float:
        return key_value(self.low - _KEY_OFFSET)

    def local_ties(self) -> int:
        """How many local scores equal the threshold (counted once)."""
        if self._local_ties is None:
            values = _host(self.request.scores.detach())
            lib = np if isinstance(values, np.ndarray) else torch
            self._local_ties = int(lib.count_nonzero(values == self.threshold))
        return self._local_ties

    def row_ties(self, rows: int, width: int) -> torch.Tensor:
        """int64 ``(rows,)``: the local threshold ties in each row of the matrix view, for a segment whose
        range indexes a column block ``width`` columns wide."""
        values = self.request.scores.detach()
        where = (values == self.threshold).nonzero().view(-1).cpu() + self.request.segment.lo
        return torch.bincount(where // width, minlength=rows)

    def mask(self, selected_ties: int) -> torch.Tensor:
        """The answer, given how many local threshold ties are selected (the first ones, in local flat order,
        which is global flat order restricted to this rank): ``>= T`` up to the cut after the last selected
        local tie, ``> T`` from there on."""
        scores, threshold, mask = self.request.scores, self.threshold, self.request.out
        if mask is None:
            mask = torch.empty(scores.numel(), dtype=torch.bool, device=scores.device)
        values, out = _host(scores.detach()), _host(mask)
        cut = len(values)
        if self.ties is not None:
            cut = locate_ties(values, threshold, selected_ties)
        lib = np if isinstance(out, np.ndarray) else torch
        lib.greater_equal(values[:cut], threshold, out=out[:cut])
        lib.greater(values[cut:], threshold, out=out[cut:])
        return mask


def _choose_bins(hist: torch.Tensor, needs: Sequence[int]) -> list[tuple[int, int, int]]:
    """Per row of ``hist`` (R, 256): the bin holding the ``need``-th largest, the count above it, its count."""
    hist = hist.to(torch.int64).cpu()
    from_top = hist.flip(1).cumsum(1)
    steps = (from_top < torch.tensor(needs, dtype=torch.int64).unsqueeze(1)).sum(1, keepdim=True)
    digits = (_BINS - 1) - steps
    counts = hist.gather(1, digits)
    above = from_top.gather(1, steps) - counts
    return list(zip(digits.view(-1).tolist(), above.view(-1).tolist(), counts.view(-1).tolist()))


def _advance(selections: Sequence[_Selection], hist: torch.Tensor) -> None:
    """Advances each selection by its row of the global histograms ``hist`` (len(selections), 256)."""
    for selection, choice in zip(selections, _choose_bins(hist, [s.need for s in selections])):
        selection.advance(*choice)


def _finish(comm: Collectives, selections: Sequence[_Selection], dtype: torch.dtype) -> None:
    """All-reduced radix passes until every selection is done (the same number of passes on every rank)."""
    open_ = [s for s in selections if not s.done]
    while open_:
        hist = comm.all_reduce(torch.stack([s.histogram() for s in open_]).to(dtype))
        _advance(open_, hist)
        open_ = [s for s in open_ if not s.done]


def _tie_quotas(comm: Collectives, selections: Sequence[_Selection]) -> dict[_Selection, int]:
    """Per contiguous selection with split ties: how many local ties are selected, from the ties held by ranks
    at lower flat offsets (one batched all-gather of ``(lo, local ties)``; ranks with empty segments hold no
    ties, so their ``lo`` is moot)."""
    if not selections:
        return {}
    device = selections[0].request.scores.device
    mine = torch.tensor([[s.request.segment.lo, s.local_ties()] for s in selections], device=device)
    every = comm.all_gather_scalars(mine.view(-1)).view(comm.world_size, len(selections), 2)
    below = every[..., 0] < mine[:, 0].unsqueeze(0)
    offsets = (every[..., 1] * below).sum(0).tolist()
    return {s: min(max(s.ties - offset, 0), s.local_ties()) for s, offset in zip(selections, offsets)}


def _block_quotas(comm: Collectives, selections: Sequence[_Selection]) -> dict[_Selection, int]:
    """`_tie_quotas` for segments with column blocks: one batched all-gather of every rank's ``(lo, c0,
    width)`` and per-row tie counts. In row ``i`` each rank holds one run of columns, starting at ``c0`` (at
    ``c0 + lo % width`` in its first row), and runs of different ranks are disjoint, so the ties before this
    rank's run in row ``i`` are all ties of rows ``< i`` plus those of the ranks whose row-``i`` run starts
    further left; a rank's ties in a row are selected while that count stays below the open slots."""
    if not selections:
        return {}
    rows_of, mine = [], []
    for s in selections:
        segment = s.request.segment
        rows, cols = segment.matrix_shape
        c0, width = segment.columns(cols)
        rows_of.append(rows)
        mine.append(torch.cat([torch.tensor([segment.lo, c0, width]), s.row_ties(rows, width)]))
    every = comm.all_gather_scalars(torch.cat(mine)).view(comm.world_size, -1).cpu()
    quotas, start = {}, 0
    for s, rows in zip(selections, rows_of):
        table = every[:, start : start + 3 + rows]
        start += 3 + rows
        lo, c0, width, ties = table[:, 0], table[:, 1], table[:, 2], table[:, 3:]
        first = torch.full_like(ties, 0) + c0.unsqueeze(1)
        first[torch.arange(len(lo)), (lo // width).clamp(max=rows - 1)] += lo % width
        me = comm.rank
        left = (first < first[me]).to(torch.int64)
        before = (ties.cumsum(1) - ties).sum(0) + (ties * left).sum(0)
        quotas[s] = int((s.ties - before).clamp(min=0).minimum(ties[me]).sum())
    return quotas


def _check(requests: Sequence[TopKMask]) -> None:
    for r in requests:
        scores = r.scores
        if isinstance(scores, ScoreProduct) and isinstance(scores.direction, torch.Tensor):
            operands = {"direction": scores.direction, "grad": scores.grad}
        elif isinstance(scores, ScoreProduct):
            operands = {"grad": scores.grad}
        else:
            operands = {"scores": scores}
            if scores.dtype != torch.float32:
                raise TypeError(f"top-k scores of tensor {r.segment.index} must be float32, got {scores.dtype}")
        for name, tensor in operands.items():
            if tensor.dim() != 1 or tensor.numel() != r.segment.length:
                raise ValueError(
                    f"top-k {name} of tensor {r.segment.index} have shape {tuple(tensor.shape)}, expected "
                    f"({r.segment.length},) for segment [{r.segment.lo}, {r.segment.hi})"
                )
        if isinstance(r.k, bool) or not isinstance(r.k, int) or not 0 <= r.k <= r.segment.numel:
            raise ValueError(f"k={r.k!r} outside [0, {r.segment.numel}] for tensor {r.segment.index}")


def _device(request: TopKMask) -> torch.device:
    scores = request.scores
    return scores.grad.device if isinstance(scores, ScoreProduct) else scores.device


def _whole_mask(request: TopKMask) -> torch.Tensor | PackedMask | None:
    """The answer for a tensor this rank holds whole, by the local selection (`request_mask`, which checks
    finiteness itself), or None when its scores are not finite."""
    try:
        return request_mask(request)
    except NonFiniteScoresError:
        return None


def _nonfinite(scores: torch.Tensor) -> bool:
    """NaN or infinity in ``scores`` (one min/max reduction)."""
    if scores.numel() == 0:
        return False
    return not bool(torch.stack(torch.aminmax(scores)).isfinite().all())


def _histogram_nonfinite(selection: _Selection, histogram: torch.Tensor) -> bool:
    """NaN or infinity among a selection's scores, given the top-byte ``histogram`` of their keys: non-finite
    floats fall in the outer bins only (0: -inf and negative NaNs, 255: +inf and positive NaNs), so the scores
    are scanned only when one of those holds a key (a finite ``|s| >= 2**127`` would too)."""
    if int(histogram[0]) == 0 and int(histogram[_BINS - 1]) == 0:
        return False
    return _nonfinite(selection.request.scores)


def _local_flag(request: TopKMask, selection: _Selection | None, histogram: torch.Tensor | None,
                answers: dict[int, torch.Tensor | None], i: int) -> bool:
    """Whether request ``i``'s local scores hold NaN or infinity."""
    if i in answers:
        return answers[i] is None
    if request.segment.length == 0:
        return False
    if selection is not None:
        return _histogram_nonfinite(selection, histogram)
    return _nonfinite(request.score_tensor())


def raise_nonfinite(indices: Sequence[int]) -> None:
    """`NonFiniteScoresError` naming tensors ``indices``, unless there are none."""
    if indices:
        raise NonFiniteScoresError(
            f"MGUP mask scores of tensors {list(indices)} contain NaN or infinity (non-finite gradient?)"
        )


def _first_pass(
    comm: Collectives,
    requests: Sequence[TopKMask],
    selections: dict[int, _Selection],
    answers: dict[int, torch.Tensor | None],
    dtype: torch.dtype,
) -> list[_Selection]:
    """The first all-reduce: per request (non-finite, held whole) flags, then the top-byte histograms of the
    selecting requests (zeros where this rank holds nothing or the whole tensor: ``answers`` has its local
    answer, None for non-finite scores). Raises `NonFiniteScoresError` on every rank if any rank saw NaN/inf.
    Returns the selections of split tensors, advanced by their histograms; ``selections`` gains those of the
    split tensors of which this rank holds nothing."""
    selecting = [i for i, r in enumerate(requests) if 0 < r.k < r.segment.numel]
    local = {i: s.histogram() for i, s in selections.items()}
    flags = []
    for i, r in enumerate(requests):
        flags += [_local_flag(r, selections.get(i), local.get(i), answers, i), r.segment.is_whole]
    sent = torch.zeros(len(flags) + _BINS * len(selecting), dtype=dtype, device=_device(requests[0]))
    sent[: len(flags)] = torch.tensor(flags, dtype=dtype)
    rows = sent[len(flags) :].view(len(selecting), _BINS)
    for row, i in enumerate(selecting):
        if i in local:
            rows[row] = local[i]
    reduced = comm.all_reduce(sent)
    header = reduced[: len(flags)].view(-1, 2).tolist()
    raise_nonfinite([r.segment.index for r, (flag, _) in zip(requests, header) if flag])
    rows = reduced[len(flags) :].view(len(selecting), _BINS)
    split = [(i, row) for i, row in zip(selecting, rows) if not header[i][1]]
    for i, _ in split:
        if i not in selections:  # nothing held here: an empty selection keeps this rank in the passes
            requests[i].score_tensor()
            selections[i] = _Selection(requests[i])
            selections[i].histogram()  # (empty) digits for `advance`
    _advance([selections[i] for i, _ in split], torch.stack([row for _, row in split]) if split else rows[:0])
    return [selections[i] for i, _ in split]


def _answer(request: TopKMask, selection: _Selection | None, quotas: dict[_Selection, int]) -> torch.Tensor:
    length = request.segment.length
    if selection is None or length == 0:  # k = 0 or numel, or nothing held here
        return torch.full((length,), request.k == request.segment.numel, dtype=torch.bool, device=_device(request))
    return selection.mask(quotas.get(selection, 0))


def topk_masks(comm: Collectives, requests: Sequence[TopKMask]) -> list[torch.Tensor | PackedMask]:
    """Masks answering ``requests`` (see `TopKMask`: bool, or a `PackedMask` for a request that takes one and a
    tensor this rank holds whole); collective over ``comm``'s group.

    A rank holding a request's tensor whole answers it with the local selection (`topk_mask`, or
    `topk_mask_of_product` for scores given as a `ScoreProduct`, which are then never formed) before
    the first all-reduce; the others take part in the radix passes of the split tensors, whose local scores are
    formed (`TopKMask.score_tensor`) where this rank holds some. Request lists that differ between ranks
    desynchronise the group.
    """
    _check(requests)
    if not requests:
        return []
    answers = {i: _whole_mask(r) for i, r in enumerate(requests) if r.segment.is_whole}
    dtype = torch.int64 if max(r.segment.numel for r in requests) >= 2**31 else torch.int32
    selections = {}
    for i, r in enumerate(requests):
        if 0 < r.k < r.segment.numel and 0 < r.segment.length < r.segment.numel:
            r.score_tensor()
            selections[i] = _Selection(r)
    split = _first_pass(comm, requests, selections, answers, dtype)
    _finish(comm, split, dtype)
    tied = [s for s in split if s.ties is not None]
    quotas = _tie_quotas(comm, [s for s in tied if s.request.segment.block is None])
    quotas.update(_block_quotas(comm, [s for s in tied if s.request.segment.block is not None]))
    return [answers[i] if i in answers else _answer(r, selections.get(i), quotas) for i, r in enumerate(requests)]


@dataclass
class NonFiniteVerdict:
    """Whether any rank saw NaN or infinity in the scores of tensors ``indices``: one flag per tensor, summed over
    the ranks by an all-reduce that may still be in flight."""

    flags: PendingReduction
    indices: list[int]

    def settle(self) -> list[int]:
        """Waits for the flags; returns the indices of the tensors whose scores are not finite (the same list
        on every rank)."""
        return [index for index, flag in zip(self.indices, self.flags.wait().tolist()) if flag]


def whole_topk_masks(
    comm: Collectives, requests: Sequence[TopKMask]
) -> tuple[list[torch.Tensor | PackedMask | None], NonFiniteVerdict]:
    """`topk_masks` for a round in which some rank holds each requested tensor whole, as the caller knows from
    its layout (every rank must make the same call): this rank's segments are whole or empty, so every answer
    is local (`request_mask`, or an empty mask) and the only collective is the non-finite flags' all-reduce,
    which is started and not waited for. The answers may be used only after the returned verdict has settled
    with no tensor named; the answer for a tensor whose local scores are not finite is None."""
    _check(requests)
    for r in requests:
        if not (r.segment.is_whole or r.segment.length == 0):
            raise ValueError(f"tensor {r.segment.index} is split here ({r.segment}); it needs topk_masks")
    answers = [_whole_mask(r) if r.segment.is_whole else _answer(r, None, {}) for r in requests]
    flags = torch.tensor([answer is None for answer in answers], dtype=torch.int32, device=_device(requests[0]))
    return answers, NonFiniteVerdict(comm.start_all_reduce(flags), [r.segment.index for r in requests])
