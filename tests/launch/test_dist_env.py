"""Rank/world detection from torchrun, deepspeed and mpirun environments."""
from __future__ import annotations

import pytest

from launch.dist_env import cpu_threads, detect
from launch.errors import LaunchError


def test_no_launcher_is_a_world_of_one() -> None:
    env = detect(None, {})
    assert (env.rank, env.world_size, env.local_rank, env.launched, env.is_main) == (0, 1, 0, False, True)


def test_torchrun_variables() -> None:
    env = detect(None, {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launched, env.is_main) == (3, 4, 1, True, False)


def test_deepspeed_local_rank_argument_fills_a_missing_local_rank() -> None:
    env = detect(1, {"RANK": "1", "WORLD_SIZE": "2"})
    assert (env.rank, env.local_rank) == (1, 1)


def test_mpirun_variables_when_rank_is_not_set() -> None:
    env = detect(None, {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launched) == (1, 2, 1, True)
    assert env.pg_backend == ("nccl" if env.device.type == "cuda" else "gloo")


@pytest.mark.parametrize("variable", ["LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"])
def test_ranks_on_one_cpu_machine_split_its_cores(variable: str) -> None:
    environ = {"RANK": "0", "WORLD_SIZE": "4", variable: "2"}
    env = detect(None, environ)
    assert env.local_world_size == 2
    if env.device.type == "cpu":
        assert cpu_threads(env, environ, cpu_count=16) == 8
        assert cpu_threads(env, environ, cpu_count=1) == 1
        assert cpu_threads(env, {**environ, "OMP_NUM_THREADS": "1"}, cpu_count=16) is None
    assert cpu_threads(detect(None, {}), {}, cpu_count=16) is None


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"RANK": "0"}, "WORLD_SIZE is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "rank 2 is not in"),
        ({"OMPI_COMM_WORLD_RANK": "0"}, "OMPI_COMM_WORLD_SIZE is not"),
    ],
)
def test_bad_environments(environ: dict, needle: str) -> None:
    with pytest.raises(LaunchError, match=needle):
        detect(None, environ)
