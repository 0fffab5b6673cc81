"""Training backends, looked up by the config's ``backend`` name (see `registry`).

Importing this package registers the implemented backends; add new ones here.
"""
from launch.backends import ddp, deepspeed, fsdp2, megatron, single, zero  # noqa: F401  (registration side effect)
from launch.backends.base import Backend, Engine, OptimizerFactory
from launch.backends.registry import KNOWN_BACKENDS, backend_class, register

__all__ = ["KNOWN_BACKENDS", "Backend", "Engine", "OptimizerFactory", "backend_class", "register"]
