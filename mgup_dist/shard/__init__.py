"""Distribution: layouts (which rank holds which range of each tensor) and the tensor-wide collectives."""
from mgup_dist.shard.segment import Segment

__all__ = ["Segment"]
