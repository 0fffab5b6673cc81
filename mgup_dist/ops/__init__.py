"""Tensor-wide operations (sum, exact top-k, orthogonalize) behind one interface, `TensorOps`."""
from mgup_dist.ops.base import TensorOps
from mgup_dist.ops.local import LocalOps

__all__ = ["LocalOps", "TensorOps"]
