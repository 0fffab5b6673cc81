"""Splitting a pass over index ranges across threads (numpy and the native kernels release the GIL).

The portable selection passes of `mgup_dist.ops.select` run on numpy views of CPU tensors, which use one thread
where torch would use ``torch.get_num_threads()``. `map_ranges` gives them the same parallelism: ranges go to
a thread pool of that many workers, and the results come back in range order, so a caller that combines them
in order gets exactly the single-threaded result. `parts` sizes the ranges of the native kernels, which run
them on torch's OpenMP team instead.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

T = TypeVar("T")
RANGE = 1 << 18  # elements per task: large enough that the per-task overhead is small

_pool: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, executor)


def workers() -> int:
    """How many threads a pass may use: torch's intra-op thread count."""
    return torch.get_num_threads()


def _executor(count: int) -> ThreadPoolExecutor:
    """The shared pool of ``count`` threads; a fresh one after a fork (the parent's threads are gone) or when
    the thread count changed."""
    global _pool
    pid = os.getpid()
    if _pool is None or _pool[:2] != (pid, count):
        if _pool is not None and _pool[0] == pid:
            _pool[2].shutdown(wait=False)
        _pool = (pid, count, ThreadPoolExecutor(count, thread_name_prefix="mgup-select"))
    return _pool[2]


def map_ranges(fn: Callable[[int, int], T], numel: int) -> list[T]:
    """``[fn(lo, hi) for consecutive ranges [lo, hi) covering [0, numel)]``, in order: one range ``[0, numel)``
    when `workers` is 1 or ``numel <= RANGE``, else ranges of `RANGE` elements run on `workers` threads.
    ``fn`` must be safe to run concurrently on disjoint ranges."""
    if workers() < 2 or numel <= RANGE:
        return [fn(0, numel)]
    bounds = [(lo, min(lo + RANGE, numel)) for lo in range(0, numel, RANGE)]
    return list(_executor(workers()).map(lambda bound: fn(*bound), bounds))


def parts(numel: int) -> int:
    """How many consecutive near-equal ranges a single-call pass over ``numel`` elements splits into (one per
    worker, each at least `RANGE` elements): the native kernels run them on torch's own OpenMP team."""
    return max(1, min(workers(), numel // RANGE))
