"""`torch.optim.Optimizer` classes of mgup_dist (spec §0)."""
from mgup_dist.optim.adam import AdamW, AlphaAdam, CMGUPAdamW, MGUPAdamW
from mgup_dist.optim.base import RuleOptimizer
from mgup_dist.optim.lion import Lion, MGUPLion
from mgup_dist.optim.mars import MARSAdamW
from mgup_dist.optim.muon import MARSM, MGUPMuon, Muon
from mgup_dist.optim.param_groups import muon_param_groups
from mgup_dist.optim.registry import OPTIMIZERS, build_optimizer, optimizer_class

__all__ = [
    "AdamW", "AlphaAdam", "CMGUPAdamW", "Lion", "MARSAdamW", "MARSM", "MGUPAdamW", "MGUPLion", "MGUPMuon",
    "Muon", "OPTIMIZERS", "RuleOptimizer", "build_optimizer", "muon_param_groups", "optimizer_class",
]
