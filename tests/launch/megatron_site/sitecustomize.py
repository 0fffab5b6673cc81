"""Test-only: installs the Megatron CPU shim at interpreter start-up in launcher subprocesses.

Put this folder and the repository root on ``PYTHONPATH`` of a ``launch.pretrain`` subprocess to run backend
``megatron`` on gloo CPU ranks (see `tests.integrations.megatron_shim`). Besides the shim, Megatron's CUDA RNG
tracker ``fork`` (entered around attention dropout) becomes a no-op: there is no CUDA generator on the CPU and
the launcher's Megatron GPT has no dropout, so no random numbers are drawn there. Never used outside the tests.
"""
import contextlib

from megatron.core.tensor_parallel import random as megatron_random

from tests.integrations import megatron_shim

megatron_shim.install()
megatron_random.CudaRNGStatesTracker.fork = contextlib.contextmanager(lambda self, name=None: (yield))
