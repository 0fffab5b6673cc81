"""Hyperparameter validation (spec §0.2): every bad value is a ValueError naming it, raised at construction;
unknown keywords are a TypeError; a 1-D param in a use_muon=True group is a ValueError."""
import math

import pytest
import torch

from mgup_dist import build_optimizer
from tests.reference import DEFAULTS, MUON_FAMILY
from tests.reference.cases import OPTIMIZER_NAMES

NAN, INF = math.nan, math.inf
BAD_BETAS = [(0.9, 1.0), (-0.1, 0.9), (1.0, 0.5), (0.9,), (0.9, NAN), "0.9"]
BAD = {
    "lr": [-1e-3, NAN, INF],
    "eps": [-1e-8, NAN, INF],
    "adamw_eps": [-1e-8, NAN],
    "weight_decay": [-0.1, NAN, INF],
    "weight_decay_1d": [-0.1, INF],
    "lr_1d": [-1e-3, NAN],
    "betas": BAD_BETAS,
    "adamw_betas": BAD_BETAS,
    "betas_1d": BAD_BETAS,
    "momentum": [1.0, -0.1, NAN],
    "alpha_ema": [1.0, -0.5, INF],
    "mask_ratio": [-0.1, 1.5, NAN],
    "alpha_min": [0.0, 1.1, -0.5, NAN],
    "alpha": [-1.0, INF, NAN],
    "gamma": [-0.5, NAN, INF],
    "ns_steps": [0, -1, 2.5, True],
    "score_source": ["gradient", None],
    "ns_dtype": [torch.float16, torch.float64, "float64", None],
}
GOOD = {
    "betas": [(0.0, 0.0), [0.5, 0.999]],
    "adamw_betas": [(0.0, 0.0)],
    "momentum": [0.0],
    "alpha_ema": [0.0, 0.999],
    "mask_ratio": [0.0, 1.0],
    "alpha_min": [1.0, 1e-6],
    "alpha": [0.0],
    "gamma": [0.0],
    "lr": [0.0],
    "ns_dtype": ["bfloat16", "float32", torch.float32, torch.bfloat16],
}


def _keys(name: str) -> set[str]:
    return set(DEFAULTS[name]) | ({"ns_dtype"} if name in MUON_FAMILY else set())


def _cases(table: dict) -> list[tuple[str, str, object]]:
    return [(name, key, value) for name in OPTIMIZER_NAMES for key in sorted(_keys(name)) if key in table
            for value in table[key]]


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize("name, key, value", _cases(BAD))
def test_bad_value_raises_value_error_naming_it(name: str, key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        build_optimizer(name, _params(), **{key: value})


@pytest.mark.parametrize("name, key, value", _cases({k: v[:1] for k, v in BAD.items()}))
def test_bad_value_in_a_param_group_raises_value_error(name: str, key: str, value) -> None:
    with pytest.raises(ValueError, match=key):
        build_optimizer(name, [{"params": _params(), key: value}])


@pytest.mark.parametrize("name, key, value", [c for c in _cases(GOOD) if not (c[0] == "mars_adamw" and c[1] == "lr")])
def test_boundary_values_are_accepted(name: str, key: str, value) -> None:
    optimizer = build_optimizer(name, _params(), **{key: value})
    params = optimizer.param_groups[0]["params"]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()


@pytest.mark.parametrize("name", ["muon", "mgup_muon", "mars_m"])
def test_ns_dtype_names_are_normalised_to_dtypes(name: str) -> None:
    optimizer = build_optimizer(name, _params(), ns_dtype="float32")
    assert optimizer.param_groups[0]["ns_dtype"] is torch.float32


def test_mars_adamw_needs_positive_constructor_lr_for_its_fixed_lr_1d_ratio() -> None:
    """Project choice (spec §4.4 fixes lr_1d/lr at construction): lr = 0 there is a clear ValueError."""
    with pytest.raises(ValueError, match="lr"):
        build_optimizer("mars_adamw", _params(), lr=0.0)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_unknown_keyword_is_type_error(name: str) -> None:
    with pytest.raises(TypeError, match="nesterov_momentum"):
        build_optimizer(name, _params(), nesterov_momentum=True)


@pytest.mark.parametrize("name", MUON_FAMILY)
def test_one_dimensional_param_in_use_muon_group_is_value_error(name: str) -> None:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "use_muon": True},
              {"params": [torch.nn.Parameter(torch.zeros(4))], "use_muon": True}]
    with pytest.raises(ValueError, match="use_muon"):
        build_optimizer(name, groups)
