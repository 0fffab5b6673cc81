"""Python side of the native kernels: ranges split over threads, results combined in index order.

Arrays are 1-D C-contiguous numpy views of CPU tensors, or the tensors themselves (`usable` ones): scores ``a``
(float32), with ``b`` (float32, same length) when the scores are the products ``a·b`` (see
`mgup_dist.rules.requests.ScoreProduct`), masks bool, or where a function takes ``packed`` one bit per element
(the first `packed_size` bytes of a uint8 or bool buffer: element ``i`` is bit ``i % 8`` of byte ``i // 8``). A
pass may also form an Adam direction ``u = a/(sqrt(v) + eps)`` and take the scores ``u·b`` (a `Quotient`). Callers check dtypes and lengths;
these functions only require `mgup_dist.native.library()` to be loaded. Passes over whole tensors split into
`mgup_dist.native.threads.parts` ranges that torch's OpenMP team runs; results never depend on the thread count.
"""
from __future__ import annotations

import ctypes
import threading
from functools import lru_cache
from typing import NamedTuple, Union

import numpy as np
import torch

from mgup_dist.native import library
from mgup_dist.native.threads import parts, workers

Array = Union[np.ndarray, torch.Tensor]  # a 1-D numpy array, or a `usable` tensor

_BAND_SHARE = 16  # a range's band buffer starts at 1/16 of its length plus _BAND_MIN (grown when that overflows)
_BAND_MIN = 1024
_SAMPLES_PER_PART = 2048  # a strided gather splits over threads in ranges of at least this many scores (each a cache miss)


class Counts(NamedTuple):
    """One counting pass: ``above_upper`` scores > upper, ``band`` the scores in ``(lower, upper]`` (in index
    order; empty when not collected) and ``where`` their flat positions (int64; empty unless a mask was asked
    for), ``inside`` how many there are, ``nonfinite`` NaN or infinite scores."""

    above_upper: int
    inside: int
    nonfinite: int
    band: np.ndarray
    where: np.ndarray


class Quotient(NamedTuple):
    """The Adam direction a counting pass forms from its ``a`` (the first moment): ``u = a/(sqrt(v) + eps)``
    into ``u``, bit for bit `adam_direction`; ``v`` and ``u`` are float32 of ``a``'s length. With ``moments``
    (`moment_coefficients`) the pass first updates ``a`` and ``v`` in place from the gradient ``b``, bit for bit
    `adam_direction` with the same moments."""

    v: Array
    eps: float
    u: Array
    moments: np.ndarray | None = None


_NO_QUOTIENT = Quotient(None, 0.0, None)  # the fields a pass without a quotient passes on: NULL v, u and moments


@lru_cache(maxsize=64)
def moment_coefficients(beta1: float, beta2: float) -> np.ndarray:
    """The float32 ``[β1, 1−β1, β2, 1−β2]`` (each computed in float64, then rounded) the native moment update
    takes: ``m ← fma(g, 1−β1, m·β1)``, ``v ← fma((1−β2)·g, g, v·β2)``, bit for bit torch's
    ``m.mul_(β1).add_(g, alpha=1−β1)`` and ``v.mul_(β2).addcmul_(g, g, value=1−β2)`` on CPUs with FMA (the array
    is shared: do not write to it)."""
    return np.array([beta1, 1 - beta1, beta2, 1 - beta2], dtype=np.float32)


_DTYPES = (torch.float32, torch.bool, torch.uint8)


def usable(*tensors: torch.Tensor | None, dtypes: tuple[torch.dtype, ...] = _DTYPES) -> bool:
    """Whether the kernels can read these tensors: loaded, and each (None aside) a 1-D contiguous CPU tensor of one
    of ``dtypes`` (default: float32, bool or uint8 (packed bits))."""
    if library() is None:
        return False
    for t in tensors:
        if t is not None and not (t.is_cpu and t.dim() == 1 and t.is_contiguous() and t.dtype in dtypes):
            return False
    return True


_workspaces = threading.local()


class _Buffer(NamedTuple):
    """A workspace buffer and its first element's address."""

    array: np.ndarray
    address: int


def _buffer(name: str, size: int, dtype: type) -> _Buffer:
    """The thread's whole 1-D ``dtype`` buffer for ``name``, of at least ``size`` elements, kept per thread and grown
    as needed, so repeated passes do not map fresh pages each time; its contents are only valid until the next
    call with ``name``."""
    cache = _workspaces.__dict__
    found = cache.get(name)
    if found is None or found.array.size < size:
        array = np.empty(max(size, 2 * (0 if found is None else found.array.size)), dtype=dtype)
        found = cache[name] = _Buffer(array, array.ctypes.data)
    return found


def _workspace(name: str, size: int, dtype: type) -> np.ndarray:
    """The first ``size`` elements of `_buffer` ``name``."""
    return _buffer(name, size, dtype).array[:size]


def _first_capacity(n: int, count: int) -> int:
    """Each of ``count`` ranges' band room in a first counting pass over ``n`` scores (see `_BAND_SHARE`)."""
    return n // count // _BAND_SHARE + _BAND_MIN


def _key_buffers(size: int) -> tuple[_Buffer, _Buffer]:
    """The uint32 buffers the radix order statistics of ``size`` values need: keys (``size`` entries) and work
    (``2·size``)."""
    return _buffer("keys", size, np.uint32), _buffer("order", 2 * size, np.uint32)


def _length(array: Array) -> int:
    """The length of a 1-D numpy array or tensor (``shape[0]``: a tensor's ``len`` is a slower Python call)."""
    return array.shape[0]


def _address(array: Array | None) -> int | None:
    """The first element's address of a numpy array or a CPU tensor (None passes through)."""
    if array is None:
        return None
    return array.data_ptr() if isinstance(array, torch.Tensor) else array.ctypes.data


def packed_size(n: int) -> int:
    """Bytes of a packed mask of ``n`` elements."""
    return (n + 7) // 8


def count_band(
    a: Array, b: Array | None, lower: float, upper: float, collect: bool, mask: Array | None = None,
    quotient: Quotient | None = None, packed: bool = False,
) -> Counts:
    """One pass over the scores counting those above ``upper`` and in ``(lower, upper]`` (collected into
    ``band`` when ``collect``) and the non-finite ones. With a ``mask`` (bool of the scores' length, or packed
    bits) the pass also writes ``mask = s > upper`` and, when collecting, the band's positions into ``where``:
    the mask is then exact everywhere but at those positions. With a ``quotient`` (and ``b``) the scores are
    ``u·b`` for the direction ``u`` the pass forms from ``a`` (see `Quotient`; its moments are updated once, also
    when a band wider than the buffer makes the pass run again)."""
    v, eps, u, moments = quotient or _NO_QUOTIENT
    n, count = _length(a), parts(_length(a))
    capacity = _first_capacity(n, count) if collect else 0
    while True:
        band = _workspace("band", capacity * count, np.float32) if collect else None
        where = _workspace("where", capacity * count, np.int64) if collect and mask is not None else None
        out = np.zeros((count, 4), dtype=np.int64)
        library().mgup_count_band(_address(a), _address(b), _address(v), _address(moments), eps, _address(u), n,
                                  lower, upper, _address(band), _address(where), capacity, None, _address(mask),
                                  packed, _address(out), count)
        if not collect or out[:, 3].max() <= capacity:
            break
        capacity = int(out[:, 3].max())  # rare: a band wider than the guess; collect it again, whole
        moments = None  # the first pass updated the moments: the next one only forms the direction again
    totals = out.sum(axis=0)
    spans = [slice(t * capacity, t * capacity + int(out[t, 3])) for t in range(count)]
    band_values = np.concatenate([band[span] for span in spans]) if collect else a[:0]
    positions = np.concatenate([where[span] for span in spans]) if where is not None else np.empty(0, np.int64)
    return Counts(int(totals[0]), int(totals[1]), int(totals[2]), band_values, positions)


def fill_mask(a: np.ndarray, b: np.ndarray | None, value: float, cut: int, out: np.ndarray) -> None:
    """``out[:cut] = s[:cut] >= value`` and ``out[cut:] = s[cut:] > value`` (bool ``out``, the scores' length)."""
    library().mgup_fill_mask(_address(a), _address(b), _length(a), value, cut, _address(out), parts(_length(a)))


def locate_ties(a: np.ndarray, b: np.ndarray | None, value: float, r: int) -> int:
    """The position just after the ``r``-th (``r >= 1``) score equal to ``value``; `ValueError` if fewer."""
    ties = ctypes.c_int64(0)
    cut = library().mgup_locate_ties(_address(a), _address(b), _length(a), value, r, ctypes.byref(ties))
    if cut < 0:
        raise ValueError(f"fewer than {r} scores equal {value}")
    return int(cut)


def mark_ties(a: np.ndarray, b: np.ndarray | None, value: float, r: int, mask: np.ndarray,
              packed: bool = False) -> None:
    """Sets ``mask`` (bool, the scores' length, or packed bits) True at the first ``r`` scores equal to ``value``
    in index order, reading only up to the r-th; `ValueError` if there are fewer."""
    marked = library().mgup_mark_ties(_address(a), _address(b), _length(a), value, r, _address(mask), packed)
    if marked < r:
        raise ValueError(f"fewer than {r} scores equal {value}")


def scaled_update(param: Array, direction: Array, mask: Array | None, high: float, low: float, alpha: float,
                  packed: bool = False, decay: float = 1.0) -> None:
    """``param ← param·decay + alpha·(direction·Φ)``, Φ = ``high`` where ``mask`` else ``low`` (1 without a mask):
    ``param`` float32, ``direction`` float32 or bfloat16 (a tensor; widened exactly), the mask bool or packed
    bits; each product rounded to float32 and the update fused (see ``mgup_scaled_update``)."""
    bf16 = isinstance(direction, torch.Tensor) and direction.dtype == torch.bfloat16
    library().mgup_scaled_update(_address(param), _address(direction), bf16, _address(mask), packed, _length(param),
                                 decay, high, low, alpha, parts(_length(param)))


def momentum(buf: Array, grad: Array, mu: float, direction: Array | None = None) -> None:
    """Sum-style momentum in place, ``buf ← buf·mu + grad`` (float32 arrays of one length), and with ``direction``
    the Nesterov input ``direction ← grad + mu·buf`` in the same pass (see ``mgup_momentum``)."""
    library().mgup_momentum(_address(buf), _address(grad), _address(direction), _length(buf), mu, parts(_length(buf)))


def adam_direction(m: Array, v: Array, eps: float, u: Array, grad: Array | None = None,
                   moments: np.ndarray | None = None) -> None:
    """``u = m/(sqrt(v) + eps)`` (float32 arrays of one length; ``u`` may be ``m`` or ``v``), each operation
    correctly rounded to float32 (bit for bit numpy's ``sqrt``, then torch's ``add_`` and ``div``). With
    ``moments`` (`moment_coefficients`) and ``grad``, ``m`` and ``v`` are first updated in place from ``grad`` in
    the same pass (``u`` is then a third array)."""
    library().mgup_adam_direction(_address(m), _address(v), _address(grad), _address(moments), _length(m), eps,
                                  _address(u), parts(_length(m)))


SELECTED, MISSED, NONFINITE = 0, 1, 2  # outcomes of `select_sampled`


def first_bracket(pool: np.ndarray, n: int, k: int, margin_sd: float) -> tuple[float, float]:
    """The thresholds ``lower <= upper`` of the first counting pass for the k-th largest (``1 <= k < n``) of
    ``n`` scores, from the non-empty float32 sample ``pool`` (see ``mgup_first_bracket``): what
    `mgup_dist.ops.threshold` brackets first, computed in C."""
    pool = np.ascontiguousarray(pool)
    bracket = np.empty(2, dtype=np.float32)
    keys, work = _key_buffers(len(pool))
    library().mgup_first_bracket(_address(pool), len(pool), n, k, margin_sd, _address(bracket), keys.address,
                                 work.address, workers())
    return float(bracket[0]), float(bracket[1])


def select_sampled(a: Array, b: Array | None, quotient: Quotient | None, k: int, mask: Array, start: int,
                   stride: int, margin_sd: float, packed: bool = False) -> int:
    """The exact top-k (``1 <= k < n``) of the scores (see `count_band`) into ``mask`` (bool, or packed bits) in one
    native call (``mgup_select_sampled``), which first gathers the sample of the scores at ``start, start + stride,
    ...`` (``0 <= start < n``, ``stride >= 1``; with a ``quotient``, from directions formed there and not stored;
    `gathered_sample` returns it). Returns `SELECTED`, `NONFINITE`, or `MISSED` (the first bracket missed, or its
    band outgrew the buffers: the mask is unsettled, the quotient formed and its moments updated)."""
    v, eps, u, moments = quotient or _NO_QUOTIENT
    n = _length(a)
    count, size = parts(n), sample_size(n, start, stride)
    capacity = _first_capacity(n, count)
    room = max(size, capacity * count)
    pool = _buffer("pool", size, np.float32)
    band, where = _buffer("band", capacity * count, np.float32), _buffer("where", capacity * count, np.int64)
    keys, work = _key_buffers(room)
    counts = _buffer("counts", 4 * count, np.int64)
    outcome = library().mgup_select_sampled(
        _address(a), _address(b), _address(v), _address(moments), eps, _address(u), n, k, _address(mask), packed,
        start, stride, pool.address, size, max(1, min(workers(), size // _SAMPLES_PER_PART)), margin_sd, band.address,
        where.address, capacity, keys.address, work.address, counts.address, count,
    )
    return int(outcome)


def sample_size(n: int, start: int, stride: int) -> int:
    """How many of ``start, start + stride, ...`` lie below ``n``."""
    return -(-(n - start) // stride)


def gathered_sample(n: int, start: int, stride: int) -> np.ndarray:
    """The sample this thread's last `select_sampled` call (over ``n`` scores from ``start`` by ``stride``)
    gathered: float32, in a workspace, valid until the next `select_sampled`."""
    return _workspace("pool", sample_size(n, start, stride), np.float32)


def settle_band(counts: Counts, value: float, r: int, mask: np.ndarray, packed: bool = False) -> None:
    """After a counting pass that wrote ``mask`` (bool, or packed bits) and collected its band (`count_band` with a
    mask), with the k-th score ``value`` in that band: ``mask`` at the band's positions becomes ``score >
    value``, or True for the first ``r`` scores equal to ``value`` in flat order."""
    band, where = np.ascontiguousarray(counts.band), np.ascontiguousarray(counts.where)
    library().mgup_settle_band(_address(band), _address(where), len(band), value, r, _address(mask), packed)


def topk_small(a: Array, b: Array | None, k: int, mask: Array, quotient: Quotient | None = None) -> int:
    """The whole exact top-k selection (``1 <= k < n``, ties to the lowest indices) into bool ``mask`` in one
    call, for tensors too small for sampling to pay; returns the number of non-finite scores (the mask is not
    written when there are any). With a ``quotient`` (and ``b``) the scores are ``u·b`` for the direction ``u`` the
    call forms from ``a`` first, moments included (see `Quotient`), as a counting pass would."""
    v, eps, u, moments = quotient or _NO_QUOTIENT
    work = _workspace("small", 2 * _length(a), np.float32)
    return int(library().mgup_topk_small(_address(a), _address(b), _address(v), _address(moments), eps, _address(u),
                                         _length(a), k, _address(mask), _address(work)))


def order_statistics(values: np.ndarray, ranks: list[int], threads: int | None = None) -> list[float]:
    """The ``ranks``-th smallest (0-based, each in ``[0, len(values))``) of finite float32 ``values`` (left
    unchanged), by radix select, all ranks in one call, on up to ``threads`` threads (default `workers`; the
    result does not depend on it)."""
    values = np.ascontiguousarray(values)
    wanted, out = np.asarray(ranks, dtype=np.int64), np.empty(len(ranks), dtype=np.float32)
    keys, work = _key_buffers(len(values))
    library().mgup_order_statistics(_address(values), len(values), _address(wanted), len(wanted),
                                    _address(out), keys.address, work.address, threads or workers())
    return [float(x) for x in out]
