"""mgup_dist: selective-update and matrix optimizers (MGUP, AlphaAdam, Muon, MARS-M) with sharded state."""
from mgup_dist.optim import (
    MARSM, AdamW, AlphaAdam, CMGUPAdamW, Lion, MARSAdamW, MGUPAdamW, MGUPLion, MGUPMuon, Muon,
    build_optimizer, muon_param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "AdamW", "AlphaAdam", "CMGUPAdamW", "Lion", "MARSAdamW", "MARSM", "MGUPAdamW", "MGUPLion", "MGUPMuon",
    "Muon", "__version__", "build_optimizer", "muon_param_groups",
]
