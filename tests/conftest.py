"""Shared pytest configuration: deterministic threads and seeds for every test."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)
