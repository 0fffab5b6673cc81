"""Test-only CPU shim for megatron-core 0.16.1 (never used by the package or by training).

Megatron's DDP buffers and distributed optimizer hard-code CUDA (``torch.cuda.current_device()``,
``device='cuda'`` factories, ``'torch.cuda.FloatTensor'`` type checks, ``.cuda()``, ``synchronize``,
``empty_cache``). `install` makes those run on CPU tensors so the integration can be tested on gloo ranks:
call it in each worker before building Megatron's DDP or optimizer. Idempotent; it patches process-wide state.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CUDA_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
               torch.bfloat16: "torch.cuda.BFloat16Tensor"}
_original_type = torch.Tensor.type


class _CpuFactories(TorchFunctionMode):
    """Rewrites ``device='cuda…'`` (string or `torch.device`) in any torch call to ``cpu``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and str(device).startswith("cuda"):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _type(self: torch.Tensor, dtype=None, non_blocking: bool = False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _CUDA_NAMES:
        return _CUDA_NAMES[self.dtype]
    return _original_type(self, dtype, non_blocking, **kwargs) if dtype is not None else _original_type(self)


def install() -> None:
    """Applies the patches in this process (once)."""
    if getattr(torch.cuda, "_mgup_dist_cpu_shim", False):
        return
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.empty_cache = lambda: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.type = _type
    _CpuFactories().__enter__()
    torch.cuda._mgup_dist_cpu_shim = True
