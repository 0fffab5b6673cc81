"""Shared pytest configuration: one intra-op thread and a fixed seed for every test.

One thread because the suite runs under pytest-xdist on small machines (more threads only contend) and because
matmul results can depend on the thread count: spawned ranks run with one thread, so in-process references
must too.
"""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
