"""The test-only fault hook fires on the chosen rank and step, on the first attempt only."""
from __future__ import annotations

from launch.faults import FAULT_RANK, KILL_AT_STEP, RESTART_COUNT, kill_due


def test_kill_is_due_only_at_its_step_rank_and_first_attempt() -> None:
    env = {KILL_AT_STEP: "5"}
    assert kill_due(5, 1, env)
    assert not kill_due(4, 1, env) and not kill_due(5, 0, env)
    assert kill_due(5, 0, {**env, FAULT_RANK: "0"})
    assert kill_due(5, 1, {**env, RESTART_COUNT: "0"})
    assert not kill_due(5, 1, {**env, RESTART_COUNT: "1"})
    assert not kill_due(5, 1, {})
