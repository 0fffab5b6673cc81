"""`ScoreProduct` and `TopKMask.score_tensor`: scores given by their factors form once, in float32, in the
buffer when one is given; `PackedMask` unpacks to its bool mask."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mgup_dist.rules.requests import PackedMask, ScoreProduct, TopKMask
from mgup_dist.shard.segment import Segment


def test_float32_product_goes_into_the_buffer_once() -> None:
    direction, grad = torch.randn(50), torch.randn(50)
    buffer = torch.empty(50)
    request = TopKMask(Segment.whole(0, (5, 10)), ScoreProduct(direction, grad, buffer), 7)
    scores = request.score_tensor()
    assert scores.data_ptr() == buffer.data_ptr() and torch.equal(scores, direction * grad)
    assert request.scores is scores and request.score_tensor() is scores  # formed once


def test_narrow_factors_multiply_in_float32() -> None:
    direction, grad = torch.randn(64).bfloat16(), torch.randn(64).half()
    scores = ScoreProduct(direction, grad).materialize()
    assert scores.dtype == torch.float32 and torch.equal(scores, direction.float() * grad.float())


def test_tensor_scores_are_returned_as_they_are() -> None:
    scores = torch.randn(8)
    assert TopKMask(Segment.whole(0, (8,)), scores, 3).score_tensor() is scores


@pytest.mark.parametrize("n", [0, 1, 8, 13, 1000])
def test_packed_mask_unpacks_to_its_bool_mask(n: int) -> None:
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    bits = np.packbits(mask.numpy(), bitorder="little")
    bits[-1:] |= np.uint8(0x80) if n % 8 else np.uint8(0)  # bits past numel are ignored
    unpacked = PackedMask(torch.from_numpy(bits), n).unpack()
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)


@pytest.mark.parametrize("n", [1, 13, 1000])
def test_packed_mask_in_a_bool_buffer(n: int) -> None:
    """Bits written into the first bytes of a bool buffer (as the native selection does): `bits` is the uint8 view
    of exactly those bytes, and unpacking ignores the rest of the buffer."""
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.5
    storage = torch.ones(n + 5, dtype=torch.bool)
    storage.view(torch.uint8)[: (n + 7) // 8] = torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    packed = PackedMask(storage, n)
    assert packed.bits.dtype == torch.uint8 and packed.bits.shape == ((n + 7) // 8,)
    assert packed.bits.data_ptr() == storage.data_ptr()
    assert torch.equal(packed.unpack(), mask)
