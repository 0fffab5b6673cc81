"""Run a function on W gloo ranks in fresh local processes and collect each rank's return value.

Used by the multi-process tests and the benchmarks (CPU, gloo; no launcher needed).

``run_distributed(world_size, fn, *args)`` spawns ``world_size`` processes; each initialises a gloo process
group (file rendezvous in a temp dir), calls ``fn(rank, world_size, *args)`` and sends back its (picklable,
e.g. CPU tensors) result. Any rank's exception fails the call with that rank's traceback. ``fn`` must be a
module-level function so it can be pickled.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 600


def _worker(
    rank: int, world_size: int, init_file: str, queue: Any, fn: Callable[..., Any], args: tuple, threads: int
) -> None:
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Plain pickle bytes: torch's queue would pass tensors as shared-memory handles, which die with this process.
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(
    world_size: int, fn: Callable[..., Any], *args: Any, threads: int = 1, timeout_s: float = TIMEOUT_S
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks, each with ``threads`` intra-op
    threads; returns the results ordered by rank. Raises `RuntimeError` with the traceback of a failed rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(rank, world_size, init_file, queue, fn, args, threads), daemon=True)
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, ok, payload = queue.get(timeout=timeout_s)
                if not ok:
                    raise RuntimeError(f"rank {rank} failed:\n{payload}")
                results[rank] = pickle.loads(payload)
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
    return [results[rank] for rank in range(world_size)]
