"""`mgup_dist.native`: building once per source and flags into the cache, the ``MGUP_DIST_NATIVE`` modes, and
clear errors (or a logged fallback) when no compiler works."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mgup_dist import native


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """An empty cache directory and no library loaded for any setting (restored afterwards)."""
    monkeypatch.setenv("MGUP_DIST_CACHE", str(tmp_path))
    native._cached.cache_clear()
    yield tmp_path
    native._cached.cache_clear()


def test_builds_once_into_the_cache(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
    library = native.library()
    built = list(fresh.glob("mgup_dist/native-*/libmgup_select.so"))
    assert library is not None and len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native.build() == built[0] and built[0].stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(fresh.glob("mgup_dist/native-*/.build-*"))  # no temporary left behind


def test_off_means_none(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "0")
    assert native.library() is None
    assert not list(fresh.iterdir())


def test_bad_setting_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "yes")
    with pytest.raises(ValueError, match="MGUP_DIST_NATIVE='yes'"):
        native.library()


def test_required_without_a_compiler_raises(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(native.NativeUnavailableError, match="no-such-compiler-xyz"):
        native.library()


def test_auto_without_a_compiler_warns_and_falls_back(
    fresh: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MGUP_DIST_NATIVE", "auto")
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with caplog.at_level(logging.WARNING, logger="mgup_dist.native"):
        assert native.library() is None
    assert "numpy path" in caplog.text


def test_compiler_errors_are_reported(fresh: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with pytest.raises(native.NativeUnavailableError, match="failed to build broken.c"):
        native.build()
    assert not list(fresh.glob("mgup_dist/native-*/*.so"))


def test_pinned_holds_the_library_across_setting_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside `pinned` (an optimizer step) the setting is not read again; on leaving, it is; blocks nest."""
    monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
    loaded = native.library()
    assert loaded is not None
    with native.pinned():
        monkeypatch.setenv("MGUP_DIST_NATIVE", "0")
        assert native.library() is loaded
        with native.pinned():
            assert native.library() is loaded
        assert native.library() is loaded
    assert native.library() is None
    with native.pinned():
        monkeypatch.setenv("MGUP_DIST_NATIVE", "1")
        assert native.library() is None
    assert native.library() is loaded


def test_a_step_reads_the_setting_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimizer step pins the library: MGUP_DIST_NATIVE is read once per step, not per kernel call."""
    import torch

    from mgup_dist.optim import build_optimizer

    reads = []
    cached = native._cached
    monkeypatch.setattr(native, "_cached", lambda raw: reads.append(raw) or cached(raw))
    params = [torch.nn.Parameter(torch.randn(n)) for n in (300, 20_000, 70_000)]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = build_optimizer("mgup_adamw", params)
    reads.clear()
    optimizer.step()
    assert len(reads) == 1
