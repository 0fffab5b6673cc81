"""Whole-tensor Frobenius norm and MARS's unit-norm clip (spec §4.1)."""
import pytest
import torch

from mgup_dist.rules.requests import TensorSum
from mgup_dist.rules.tensor_norm import clip_to_unit_norm
from mgup_dist.shard.segment import Segment


def _clip(values: torch.Tensor) -> tuple[torch.Tensor, float]:
    local = values.clone().reshape(-1)
    rule = clip_to_unit_norm(local, Segment.whole(0, tuple(values.shape)))
    request = next(rule)
    assert isinstance(request, TensorSum) and request.value.dtype == torch.float64
    try:
        rule.send(request.value)
    except StopIteration as done:
        return local.reshape(values.shape), done.value
    raise AssertionError("clip_to_unit_norm asked for more than one sum")


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_clip_is_min_of_norm_and_one_and_keeps_direction(scale: float) -> None:
    """Strict '>': a norm of exactly 1 (four entries ±0.5) is left alone; otherwise c̃ = c/‖c‖_F."""
    values = scale * torch.tensor([[0.5, -0.5], [0.5, 0.5]], dtype=torch.float64)
    clipped, norm = _clip(values)
    torch.testing.assert_close(norm, scale, rtol=1e-15, atol=0)
    expected = values / norm if scale > 1 else values
    assert torch.equal(clipped, expected)
