"""Test harness: run a function on W gloo ranks in fresh processes and collect each rank's return value.

``run_distributed(world_size, fn, *args)`` spawns ``world_size`` processes; each initialises a gloo process
group (file rendezvous in a temp dir), calls ``fn(rank, world_size, *args)`` and sends back its (picklable,
e.g. CPU tensors) result. Any rank's exception fails the call with that rank's traceback. ``fn`` must be a
module-level function so it can be pickled.
"""
from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 240


def _worker(rank: int, world_size: int, init_file: str, queue: Any, fn: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(world_size: int, fn: Callable[..., Any], *args: Any) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns results ordered by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, init_file, queue, fn, args), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=TIMEOUT_S)
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                results[rank] = payload
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return [results[rank] for rank in range(world_size)]
