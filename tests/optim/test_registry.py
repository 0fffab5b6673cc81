"""`build_optimizer` and the name registry (spec §0.1, §8 item 26)."""
import pytest
import torch

import mgup_dist
from mgup_dist import build_optimizer
from mgup_dist.optim import OPTIMIZERS
from tests.reference.cases import OPTIMIZER_NAMES

CLASS_NAMES = {
    "adamw": "AdamW", "lion": "Lion", "muon": "Muon", "mars_adamw": "MARSAdamW", "mgup_adamw": "MGUPAdamW",
    "cmgup_adamw": "CMGUPAdamW", "mgup_lion": "MGUPLion", "mgup_muon": "MGUPMuon", "alpha_adam": "AlphaAdam",
    "mars_m": "MARSM",
}


def _param() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2, 2))]


def test_registry_holds_exactly_the_ten_spec_optimizers() -> None:
    assert set(OPTIMIZERS) == set(OPTIMIZER_NAMES) == set(CLASS_NAMES)
    for name, cls in OPTIMIZERS.items():
        assert cls.__name__ == CLASS_NAMES[name]
        assert getattr(mgup_dist, cls.__name__) is cls


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_snake_camel_and_lowercase_names_select_the_same_class(name: str) -> None:
    camel = CLASS_NAMES[name]
    spellings = (name, camel, camel.lower(), name.upper(), name.replace("_", ""))
    classes = {type(build_optimizer(spelling, _param())) for spelling in spellings}
    assert classes == {getattr(mgup_dist, camel)}


def test_unknown_name_raises_value_error_listing_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        build_optimizer("adamax", _param())
    assert "adamax" in str(info.value)
    for name in OPTIMIZER_NAMES:
        assert name in str(info.value)


def test_non_string_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(None, _param())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_unknown_keyword_raises_type_error(name: str) -> None:
    with pytest.raises(TypeError, match="warmup"):
        build_optimizer(name, _param(), warmup=10)


def test_hyperparameters_reach_the_constructor_unchanged() -> None:
    optimizer = build_optimizer("MGUPAdamW", _param(), lr=0.25, mask_ratio=0.3, alpha=1.5)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["mask_ratio"], group["alpha"], group["gamma"]) == (0.25, 0.3, 1.5, 0.1)
