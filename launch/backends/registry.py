"""Backend names and the registry that maps them to implementations.

`KNOWN_BACKENDS` is every name a config may give. Implemented backends register their class with `register`
(done in `launch.backends.__init__`); a known name without an implementation fails in `backend_class` with
"backend X is not available yet" before any work starts. To add a backend: subclass
`launch.backends.base.Backend`, then register it in `launch/backends/__init__.py`.
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
    """The implementation of backend ``name``; `LaunchError` if it is unknown or not implemented yet."""
    if name not in KNOWN_BACKENDS:
        raise LaunchError(f"unknown backend {name!r}; valid backends: {', '.join(KNOWN_BACKENDS)}")
    if name not in _REGISTRY:
        raise LaunchError(f"backend {name} is not available yet (available: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]
