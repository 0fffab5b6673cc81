"""``mgup_dist.deepspeed.initialize``: a drop-in for ``deepspeed.initialize`` that runs mgup_dist optimizers
selected in the DeepSpeed JSON config under ZeRO stages 0-3 (see `mgup_dist.integrations.deepspeed`)."""
from mgup_dist.integrations.deepspeed import attach, initialize, skip_shm_build

__all__ = ["attach", "initialize", "skip_shm_build"]
