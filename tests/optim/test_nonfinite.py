"""Non-finite gradient guard in one process: a NaN/inf gradient skips the whole step (parameters and state
bitwise unchanged, no state created), counts it and logs it; training then continues exactly as if the bad
step never happened. ``"raise"`` names the parameter."""
from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch

from mgup_dist.optim import OPTIMIZERS, build_optimizer
from mgup_dist.optim.distributor import LocalDistributor
from mgup_dist.optim.nonfinite import NonFiniteGradientError, nonfinite_flags

SHAPES = ((5, 9), (7,), (4, 3))


def _grads(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in SHAPES]


def _bad(seed: int, value: float) -> list[torch.Tensor]:
    grads = _grads(seed)
    grads[1][3] = value
    return grads


def _equal(a: Any, b: Any) -> bool:
    """Bitwise equality of nested state-dict values."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


class Run:
    def __init__(self, name: str) -> None:
        torch.manual_seed(0)
        self.params = [torch.nn.Parameter(torch.randn(shape)) for shape in SHAPES]
        self.optimizer = build_optimizer(name, self.params, weight_decay=0.1)

    def step(self, grads: list[torch.Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.optimizer.step()

    def snapshot(self) -> tuple[list[torch.Tensor], dict[str, Any]]:
        return [p.detach().clone() for p in self.params], copy.deepcopy(self.optimizer.state_dict())


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_skip_leaves_everything_unchanged_and_training_continues(name: str, caplog) -> None:
    run, clean = Run(name), Run(name)
    first = run.snapshot()
    with caplog.at_level(logging.WARNING, logger="mgup_dist.nonfinite"):
        run.step(_bad(10, float("nan")))  # first step: no state may be created
    assert len(run.optimizer.state) == 0 and _equal(run.snapshot(), first)
    assert run.optimizer.skipped_steps == 1
    assert "param group 0, tensor 1, shape (7,)" in caplog.text and "skipped" in caplog.text
    for r in (run, clean):
        r.step(_grads(1))
    before = run.snapshot()
    run.step(_bad(11, float("-inf")))
    assert _equal(run.snapshot(), before) and run.optimizer.skipped_steps == 2
    for r in (run, clean):
        r.step(_grads(2))
    assert _equal(run.snapshot(), clean.snapshot()) and clean.optimizer.skipped_steps == 0


def test_raise_names_the_parameter() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = build_optimizer("adamw", model.parameters())
    optimizer.nonfinite = "raise"
    optimizer.name_parameters(model)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].weight.grad[0, 1] = float("inf")
    with pytest.raises(NonFiniteGradientError, match=r"'1\.weight' \(shape \(2, 3\)\)"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert len(optimizer.state) == 0 and optimizer.skipped_steps == 0


def test_raise_without_names_describes_the_tensor() -> None:
    run = Run("lion")
    run.optimizer.nonfinite = "raise"
    with pytest.raises(NonFiniteGradientError, match=r"param group 0, tensor 1, shape \(7,\)"):
        run.step(_bad(3, float("nan")))


def test_tensors_without_gradient_are_ignored() -> None:
    run = Run("adamw")
    run.params[2].grad = None
    for p, g in zip(run.params[:2], _grads(4)):
        p.grad = g
    run.optimizer.step()
    assert run.optimizer.skipped_steps == 0 and len(run.optimizer.state) == 2


def test_policy_is_validated_and_not_a_constructor_keyword() -> None:
    optimizer = build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))])
    assert optimizer.nonfinite == "skip"
    with pytest.raises(ValueError, match="non-finite gradient policy"):
        optimizer.nonfinite = "ignore"
    with pytest.raises(TypeError):
        build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2))], nonfinite="raise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_flags_find_every_nan_and_infinity(dtype: torch.dtype) -> None:
    """One bad value anywhere (first, middle, last element; lengths around vector widths) is flagged; finite
    extremes and empty tensors are not."""
    finfo = torch.finfo(dtype)
    for n in (1, 7, 16, 33, 1000):
        for position in sorted({0, n // 2, n - 1}):
            for bad in (float("nan"), float("inf"), float("-inf")):
                grad = torch.randn(n).to(dtype)
                grad[position] = bad
                assert nonfinite_flags([grad]).tolist() == [True], (n, position, bad)
    clean = torch.tensor([finfo.max, finfo.min, finfo.tiny, -0.0], dtype=dtype)
    assert nonfinite_flags([clean, torch.zeros(0, dtype=dtype), torch.ones(3, dtype=dtype)]).tolist() == [False] * 3
    assert nonfinite_flags([]).tolist() == []


class _Vouching(LocalDistributor):
    """A distributor whose engine vouches (``known_finite``) or not for the step; counts ``any_rank`` calls."""

    def __init__(self, vouches: bool) -> None:
        super().__init__()
        self.vouches = vouches
        self.checks = 0

    def known_finite(self) -> bool:
        return self.vouches

    def any_rank(self, flag: torch.Tensor) -> bool:
        self.checks += 1
        return super().any_rank(flag)


@pytest.mark.parametrize("vouches", [True, False])
def test_distributor_vouching_for_the_step_replaces_the_check(vouches: bool) -> None:
    """``known_finite()`` True: no scan, no ``any_rank`` (so even a NaN the engine missed is stepped with);
    False: the usual check, which skips the NaN step."""
    run = Run("adamw")
    run.optimizer.distributor = distributor = _Vouching(vouches)
    run.step(_bad(0, float("nan")))
    assert distributor.checks == (0 if vouches else 1)
    assert run.optimizer.skipped_steps == (0 if vouches else 1)
    assert bool(torch.isnan(run.params[1]).any()) == vouches
