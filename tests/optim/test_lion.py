"""Lion and MGUPLion against the float64 reference."""
import pytest

from tests.optim.stepping import reference_errors


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("lion", {}),
        ("lion", {"betas": (0.5, 0.9)}),
        ("mgup_lion", {}),
        ("mgup_lion", {"mask_ratio": 0.8, "alpha": 1.25, "gamma": 0.5}),
    ],
)
def test_matches_float64_reference(name: str, hparams: dict) -> None:
    """Mixed shapes (1-D, 1-element, both non-square orientations, 4-D, tie-heavy), weight decay on, 5 steps."""
    errors = reference_errors(name, lr=1e-2, weight_decay=0.1, **hparams)
    assert max(errors) <= 1e-12, errors
