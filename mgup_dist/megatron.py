"""``mgup_dist.megatron.get_optimizer``: ``get_megatron_optimizer`` with an mgup_dist optimizer inside Megatron-core's
distributed optimizer (see `mgup_dist.integrations.megatron`)."""
from mgup_dist.integrations.megatron import get_optimizer

__all__ = ["get_optimizer"]
