"""`map_ranges` covers [0, numel) with consecutive ranges, returns results in range order, and uses one range
when there is one worker or little work; `parts` sizes the native kernels' ranges."""
from __future__ import annotations

import threading

import pytest

from mgup_dist.native import threads


def test_ranges_cover_everything_in_order_on_several_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "workers", lambda: 3)
    monkeypatch.setattr(threads, "RANGE", 10)
    names = set()

    def record(lo: int, hi: int) -> tuple[int, int]:
        names.add(threading.current_thread().name)
        return lo, hi

    assert threads.map_ranges(record, 45) == [(0, 10), (10, 20), (20, 30), (30, 40), (40, 45)]
    assert all(name.startswith("mgup-select") for name in names)


@pytest.mark.parametrize("count, numel", [(1, 1000), (4, 10), (4, 0)])
def test_one_range_for_one_worker_or_little_work(count: int, numel: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "workers", lambda: count)
    monkeypatch.setattr(threads, "RANGE", 10)
    assert threads.map_ranges(lambda lo, hi: (lo, hi, threading.current_thread().name), numel) == [
        (0, numel, threading.current_thread().name)
    ]


@pytest.mark.parametrize("count, numel, expected", [(3, 100, 3), (4, 25, 2), (2, 19, 1), (1, 1000, 1), (4, 0, 1)])
def test_parts_one_per_worker_of_at_least_a_range(count: int, numel: int, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "workers", lambda: count)
    monkeypatch.setattr(threads, "RANGE", 10)
    assert threads.parts(numel) == expected
