"""Independent float64 re-implementation of the ten optimizers, written from spec/ALGORITHMS.md only.

It never imports `mgup_dist`; tests/optim/test_<module>.py compare the package against it.
"""
from tests.reference.masks import AmbiguousMask, mgup_factors
from tests.reference.newton_schulz import NS_COEFFICIENTS, newton_schulz5, ns_polynomial
from tests.reference.optimizer import DEFAULTS, MUON_FAMILY, ReferenceOptimizer

__all__ = [
    "AmbiguousMask", "DEFAULTS", "MUON_FAMILY", "NS_COEFFICIENTS", "ReferenceOptimizer", "mgup_factors",
    "newton_schulz5", "ns_polynomial",
]
