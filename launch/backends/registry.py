"""Backend names and the registry that maps them to implementations.

`KNOWN_BACKENDS` is every name a config may give (config validation reads it without importing the backends).
Each backend registers its class with `register` (done by importing `launch.backends`). To add a backend: add
its name here, subclass `launch.backends.base.Backend`, then import its module in `launch/backends/__init__.py`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from launch.errors import LaunchError

if TYPE_CHECKING:
    from launch.backends.base import Backend

KNOWN_BACKENDS = ("single", "ddp", "zero", "deepspeed", "fsdp2", "megatron")

_REGISTRY: dict[str, type[Backend]] = {}


def register(cls: type[Backend]) -> type[Backend]:
    """Adds ``cls`` under ``cls.name`` (which must be in `KNOWN_BACKENDS`); returns ``cls``."""
    if cls.name not in KNOWN_BACKENDS:
        raise ValueError(f"backend {cls.name!r} is not in KNOWN_BACKENDS {KNOWN_BACKENDS}")
    _REGISTRY[cls.name] = cls
    return cls


def backend_class(name: str) -> type[Backend]:
    """The implementation of backend ``name``; `LaunchError` if it is unknown."""
    if name not in _REGISTRY:
        raise LaunchError(f"unknown backend {name!r}; valid backends: {', '.join(KNOWN_BACKENDS)}")
    return _REGISTRY[name]
