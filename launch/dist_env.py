"""Where this process sits in the job: rank, world size, device, and the process group's lifetime.

Launchers tell a worker its place through the environment: ``torchrun`` and the ``deepspeed`` launcher set
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (the latter also passes ``--local_rank``); ``mpirun`` (Open MPI) sets
``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK``. With none of them the process is a world of one. The device
is ``cuda:<local_rank>`` with NCCL when CUDA is present, else the CPU with gloo; the command does not change.
On the CPU, ranks sharing a machine split its cores (`cpu_threads`) unless ``OMP_NUM_THREADS`` is set.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from launch.errors import LaunchError

DEFAULT_MASTER_ADDR = "localhost"
DEFAULT_MASTER_PORT = "29500"


@dataclass(frozen=True)
class DistEnv:
    """This process's rank among ``world_size`` and its device; ``launched`` is True under a launcher."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def pg_backend(self) -> str:
        """The torch.distributed backend for this device: NCCL on CUDA, gloo on the CPU."""
        return "nccl" if self.device.type == "cuda" else "gloo"


def _int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def _rank_world_local(environ: Mapping[str, str], local_rank_arg: int | None) -> tuple[int, int, int, bool]:
    if "RANK" in environ:
        if "WORLD_SIZE" not in environ:
            raise LaunchError("RANK is set but WORLD_SIZE is not; launch with torchrun, deepspeed or mpirun")
        rank, world = _int(environ, "RANK"), _int(environ, "WORLD_SIZE")
        local = _int(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else local_rank_arg
        return rank, world, rank if local is None else local, True
    if "OMPI_COMM_WORLD_RANK" in environ:
        if "OMPI_COMM_WORLD_SIZE" not in environ:
            raise LaunchError("OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not")
        rank, world = _int(environ, "OMPI_COMM_WORLD_RANK"), _int(environ, "OMPI_COMM_WORLD_SIZE")
        local = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in environ else rank
        return rank, world, local, True
    return 0, 1, local_rank_arg or 0, False


_LOCAL_WORLD_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")  # torchrun, deepspeed, mpirun


def detect(local_rank_arg: int | None = None, environ: Mapping[str, str] | None = None) -> DistEnv:
    """Reads the launcher's environment (default `os.environ`); ``local_rank_arg`` is ``--local_rank``."""
    environ = os.environ if environ is None else environ
    rank, world, local, launched = _rank_world_local(environ, local_rank_arg)
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"rank {rank} is not in [0, world_size={world})")
    local_world = next((_int(environ, v) for v in _LOCAL_WORLD_VARS if v in environ), 1)
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, local, device, launched, max(1, local_world))


def cpu_threads(env: DistEnv, environ: Mapping[str, str], cpu_count: int) -> int | None:
    """Intra-op threads for this CPU rank: the machine's ``cpu_count`` cores split among the ranks on it;
    None (leave torch's choice) on CUDA, with ``OMP_NUM_THREADS`` set (torchrun sets 1), or with one rank."""
    if env.device.type != "cpu" or "OMP_NUM_THREADS" in environ or env.local_world_size == 1:
        return None
    return max(1, cpu_count // env.local_world_size)


def configure_threads(env: DistEnv) -> None:
    """Applies `cpu_threads` for this process (so e.g. the deepspeed launcher's ranks do not oversubscribe)."""
    threads = cpu_threads(env, os.environ, os.cpu_count() or 1)
    if threads is not None:
        torch.set_num_threads(threads)


def init_process_group(env: DistEnv) -> None:
    """Joins the default process group (all ranks call it). Launched jobs rendezvous via ``env://``
    (``MASTER_ADDR``/``MASTER_PORT`` default to localhost:29500, e.g. under mpirun); a lone process uses an
    in-memory store, so it needs no port."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if not env.launched:
        dist.init_process_group(env.pg_backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    os.environ.setdefault("MASTER_ADDR", DEFAULT_MASTER_ADDR)
    os.environ.setdefault("MASTER_PORT", DEFAULT_MASTER_PORT)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(env.pg_backend, init_method="env://", rank=env.rank, world_size=env.world_size)
        return
    # torchrun keeps its store across restarts (--max-restarts): keys of the dead attempt (e.g. gloo's peer
    # addresses) would be read by the new one, so each attempt gets its own key prefix.
    store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size))
    store = dist.PrefixStore(f"attempt_{attempt}", store)
    dist.init_process_group(env.pg_backend, store=store, rank=env.rank, world_size=env.world_size)


def shutdown(finished: bool = False) -> None:
    """Leaves the default process group if this process joined one. ``finished``: every rank completed its
    run, so all first meet at a barrier; no rank then tears down its connections while a peer's last
    operations are still in flight (gloo can abort a process destroyed mid-exchange). After an error, ranks
    may not all get here, so they leave without one."""
    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
