"""Smoke test of the in-process A/B of two native builds: each optimizer steps on its own build, and a checkout
without kernel sources is refused before anything runs."""
from pathlib import Path

import pytest

from benchmarks import native_ab
from mgup_dist import native

REPO = Path(__file__).resolve().parents[2]


def test_each_mgup_optimizer_steps_on_its_own_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    libraries = [native_ab.load_build(REPO, tmp_path / label) for label in "ab"]
    assert libraries[0] is not libraries[1]
    seen = []
    step = native_ab.timed_step

    def recording(optimizer: object) -> float:
        seen.append(native.library())
        return step(optimizer)

    monkeypatch.setattr(native_ab, "timed_step", recording)
    times = native_ab.rounds_of(libraries, rounds=3, warmup=1, small=True)
    assert [len(row) for row in times] == [3, 3, 3]
    assert seen.count(libraries[1]) == 4 and seen.count(libraries[0]) == 8  # AdamW runs on build A's kernels
    report = native_ab.report(times, ("A", "B"))
    assert "MGUP-AdamW, build A" in report and "B - A per round" in report


def test_checkout_without_kernel_sources_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no native sources"):
        native_ab.main(["--a", str(tmp_path), "--rounds", "2", "--small"])
