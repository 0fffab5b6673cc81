"""The multi-process test harness: `mgup_dist.spawn.run_distributed` (W gloo ranks in spawned processes).

``run_distributed(world_size, fn, *args)`` calls module-level ``fn(rank, world_size, *args)`` on every rank
(one intra-op thread each) and returns the picklable results ordered by rank; a failed rank raises with its
traceback.
"""
from mgup_dist.spawn import run_distributed

__all__ = ["run_distributed"]
