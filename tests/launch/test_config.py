"""Config schema: presets, defaults, round trip, and a clear `LaunchError` for every kind of bad value."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch.backends.registry import KNOWN_BACKENDS
from launch.config import MODEL_SIZES, BatchConfig, config_to_dict, load_config, parse_config
from launch.errors import LaunchError
from tests.launch.conftest import NANO_RUN, merged

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "configs").glob("*.json"))
OPTIMIZERS = ("adamw", "lion", "muon", "mars_adamw", "mgup_adamw", "cmgup_adamw", "mgup_lion", "mgup_muon",
              "alpha_adam", "mars_m")


def _error(data: dict) -> str:
    with pytest.raises(LaunchError) as info:
        parse_config(data)
    return str(info.value)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_parse_and_round_trip(path: Path) -> None:
    cfg = load_config(path)
    assert parse_config(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_one_tiny_config_per_optimizer_and_the_quickstart() -> None:
    names = {p.stem for p in SHIPPED}
    assert {f"tiny_{name}" for name in OPTIMIZERS} | {"quickstart"} <= names
    for name in OPTIMIZERS:
        assert load_config(REPO / "configs" / f"tiny_{name}.json").optimizer.name == name
    quick = load_config(REPO / "configs" / "quickstart.json")
    assert (quick.optimizer.name, quick.model.size, quick.backend) == ("mgup_adamw", "tiny", "zero")
    assert quick.batch.split(2)[1] >= 1


def test_model_preset_and_overrides() -> None:
    cfg = parse_config(merged(NANO_RUN, {"model": {"size": "tiny", "block_size": 64}}))
    tiny = MODEL_SIZES["tiny"]
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (tiny.n_layer, tiny.n_embd, 64)
    explicit = parse_config(merged(NANO_RUN, {"model": {"n_layer": 1, "n_head": 2, "n_embd": 8, "block_size": 16}}))
    assert explicit.model.shape().n_embd == 8 and explicit.model.size is None


def test_defaults_are_filled_in() -> None:
    cfg = parse_config(merged(NANO_RUN, {"schedule": None, "data": None, "backend": None}))
    assert cfg.schedule.warmup_steps == 0 and cfg.data.path is None and cfg.backend == "ddp"
    assert cfg.train.grad_clip == 1.0 and isinstance(cfg.train.grad_clip, float)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"epochs": 3}, "unknown key epochs; valid keys: model, optimizer"),
        ({"train": {"stepz": 3}}, "unknown key train.stepz; valid keys: steps, grad_clip"),
        ({"model": {"size": "tiny", "layers": 3}}, "unknown key model.layers"),
        ({"model": "huge"}, 'model.size "huge" is unknown; valid sizes: nano, tiny'),
        ({"model": {"n_layer": 2}}, "missing key model.n_head"),
        ({"model": {"size": "nano", "n_head": 3}}, "model.n_embd 32 is not divisible by model.n_head 3"),
        ({"train": {"steps": -5}}, "train.steps must be >= 1, got -5"),
        ({"train": {"steps": "10"}}, 'train.steps must be int, got "10"'),
        ({"train": {"steps": 2.5}}, "train.steps must be int, got 2.5"),
        ({"train": {"steps": True}}, "train.steps must be int, got true"),
        ({"batch": {"micro_batch": 0}}, "batch.micro_batch must be >= 1, got 0"),
        ({"batch": {"micro_batch": 3}}, "global_batch 8 is not divisible by world_size 1 x micro_batch 3"),
        ({"data": {"max_bytes": -1}}, "data.max_bytes must be >= 1"),
        ({"train": {"grad_clip": float("nan")}}, "train.grad_clip must be a finite float, got NaN"),
        ({"data": {"path": 7}}, "data.path must be str or null, got 7"),
        ({"optimizer": {"name": "sgd"}}, "unknown optimizer 'sgd'; valid names: adamw"),
        ({"optimizer": {"name": "adamw", "momentum": 0.9}}, "unexpected hyperparameter(s) ['momentum']"),
        ({"optimizer": {"name": "mgup_adamw", "mask_ratio": 2.0}}, "mask_ratio must be in [0, 1]"),
        ({"optimizer": {"lr": 1e-4}}, "schedule.min_lr 0.0003 exceeds the optimizer lr 0.0001"),
        ({"optimizer": "adamw"}, 'optimizer must be a JSON object with a string "name"'),
        ({"schedule": {"warmup_steps": 100}}, "schedule.warmup_steps 100 exceeds train.steps 6"),
        ({"backend": "horovod"}, 'unknown backend "horovod"; valid backends: single, ddp, zero'),
        ({"backend": 3}, "backend must be str, got 3"),
        ({"batch": None}, "missing key batch"),
    ],
)
def test_bad_values_name_the_problem(overrides: dict, needle: str) -> None:
    assert needle in _error(merged(NANO_RUN, overrides))


def test_every_known_backend_name_is_accepted_by_the_schema() -> None:
    for name in KNOWN_BACKENDS:
        assert parse_config(merged(NANO_RUN, {"backend": name})).backend == name


def test_batch_split() -> None:
    assert BatchConfig(global_batch=16, micro_batch=4).split(2) == (8, 2)
    assert BatchConfig(global_batch=16, micro_batch=4).split(4) == (4, 1)
    with pytest.raises(LaunchError, match="not divisible by world_size 3"):
        BatchConfig(global_batch=16, micro_batch=4).split(3)
    with pytest.raises(LaunchError, match="not divisible by world_size 8"):
        BatchConfig(global_batch=16, micro_batch=4).split(8)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LaunchError, match="is not valid JSON"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(LaunchError, match="must be a JSON object"):
        load_config(bad)
