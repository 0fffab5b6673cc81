"""Optimizer selection from a DeepSpeed JSON config (`mgup_dist.integrations.deepspeed_config`)."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from torch import nn

from mgup_dist.integrations.deepspeed_config import (
    Settings, check_supported, deepspeed_view, load_config, optimizer_spec, resolve_type, settings,
)
from mgup_dist.optim import OPTIMIZERS
from mgup_dist.optim.validation import SCORE_SOURCES
from tests.integrations.deepspeed_harness import CONFIG_DIR

DEEPSPEED_ALSO = ("adamw", "lion", "muon")  # our names that are DeepSpeed names too


def _config(type_: str, **params: Any) -> dict[str, Any]:
    return {"optimizer": {"type": type_, "params": {"lr": 0.01, **params}}}


def _changed(name: str, value: Any) -> tuple[Any, Any]:
    """A valid non-default value for hyperparameter ``name`` as JSON writes it, and as the group holds it."""
    if isinstance(value, bool):
        return not value, not value
    if isinstance(value, tuple):
        return [0.8, 0.9], (0.8, 0.9)
    if isinstance(value, torch.dtype):
        return ("float32", torch.float32) if value == torch.bfloat16 else ("bfloat16", torch.bfloat16)
    if name == "score_source":
        other = next(s for s in SCORE_SOURCES if s != value)
        return other, other
    if isinstance(value, int):
        return value + 1, value + 1
    return value * 0.5 + 0.01, value * 0.5 + 0.01


def _type_names(name: str, cls: type) -> list[str]:
    if name in DEEPSPEED_ALSO:
        return [f"mgup_dist.{cls.__name__}", f"mgup_dist.{name}"]
    return [cls.__name__, name, name.upper().replace("_", "-")]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_optimizer_name_builds_its_class_with_every_hyperparameter(name: str) -> None:
    cls = OPTIMIZERS[name]
    hparams = {key: _changed(key, default) for key, default in cls.DEFAULTS.items()}
    json_params = json.loads(json.dumps({key: written for key, (written, _) in hparams.items()}))
    model = nn.Linear(3, 2)
    for type_name in _type_names(name, cls):
        spec = optimizer_spec({"optimizer": {"type": type_name, "params": json_params}})
        optimizer = spec.build(model.parameters())
        assert type(optimizer) is cls, type_name
        group = optimizer.param_groups[0]
        for key, (_, held) in hparams.items():
            assert group[key] == held, f"{type_name}: {key}"


@pytest.mark.parametrize("deepspeed_name", ["Adam", "AdamW", "adamw", "Lion", "Muon", "Lamb", "SGD", "RMSprop"])
def test_deepspeed_and_torch_names_keep_their_deepspeed_meaning(deepspeed_name: str) -> None:
    assert resolve_type(deepspeed_name) is None
    assert optimizer_spec(_config(deepspeed_name)) is None


def test_no_optimizer_block_selects_nothing() -> None:
    assert optimizer_spec({"train_batch_size": 8}) is None


@pytest.mark.parametrize("misspelled", ["MGUPAdam", "mgup_adamww", "mgup_dist.Adamm", "mgup_dist.SGD", "", 3])
def test_misspelled_optimizer_names_the_valid_choices(misspelled: Any) -> None:
    with pytest.raises(ValueError, match=re.escape("mgup_adamw (MGUPAdamW)")) as error:
        optimizer_spec(_config(misspelled))
    assert "mars_m (MARSM)" in str(error.value) and "DeepSpeed's own" in str(error.value)


def test_misspelled_hyperparameter_names_the_valid_ones() -> None:
    with pytest.raises(TypeError, match=r"unexpected hyperparameter\(s\) \['mask_ration'\]; valid: .*'mask_ratio'"):
        optimizer_spec(_config("MGUPAdamW", mask_ration=0.3))


def test_deepspeed_only_hyperparameters_are_rejected_for_our_optimizers() -> None:
    with pytest.raises(TypeError, match="torch_adam"):
        optimizer_spec(_config("AlphaAdam", torch_adam=True))


def test_missing_learning_rate_is_an_error_not_a_default() -> None:
    with pytest.raises(ValueError, match=r"must set \['lr'\]"):
        optimizer_spec({"optimizer": {"type": "MGUPMuon", "params": {"weight_decay": 0.1}}})
    with pytest.raises(ValueError, match=r"must set \['lr'\]"):
        optimizer_spec({"optimizer": {"type": "MGUPMuon"}})


@pytest.mark.parametrize(
    "block, message",
    [
        ({"type": "MGUPAdamW", "params": {"lr": 0.01, "mask_ratio": 1.5}}, "mask_ratio"),
        ({"type": "MGUPMuon", "params": {"lr": 0.01, "ns_dtype": "float16"}}, "ns_dtype"),
        ({"type": "MGUPAdamW", "params": [0.01]}, "must be an object"),
        ({"type": "MGUPAdamW", "param": {"lr": 0.01}}, r"unknown key\(s\) \['param'\].*valid: \['params', 'type'\]"),
        ({"params": {"lr": 0.01}}, "with a 'type'"),
        ("MGUPAdamW", "with a 'type'"),
    ],
)
def test_malformed_optimizer_blocks_fail_clearly(block: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimizer_spec({"optimizer": block})


def test_settings_section() -> None:
    assert settings({}) == Settings()
    assert settings({"mgup_dist": {"gather_max_numel": 4096, "build_shm_comm_op": True}}) == Settings(4096, True)
    valid = r"valid: \['build_shm_comm_op', 'gather_max_numel'\]"
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['gather_max_numl'\].*" + valid):
        settings({"mgup_dist": {"gather_max_numl": 1}})
    with pytest.raises(ValueError, match="gather_max_numel"):
        settings({"mgup_dist": {"gather_max_numel": -1}})
    with pytest.raises(ValueError, match="build_shm_comm_op"):
        settings({"mgup_dist": {"build_shm_comm_op": "yes"}})


def test_deepspeed_view_drops_our_blocks_and_allows_the_client_optimizer() -> None:
    config = {**_config("MGUPLion"), "mgup_dist": {}, "zero_optimization": {"stage": 2}}
    config["zero_allow_untested_optimizer"] = False
    view = deepspeed_view(config)
    assert view == {"zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    view["zero_optimization"]["stage"] = 3
    assert config["zero_optimization"]["stage"] == 2 and "optimizer" in config


def test_load_config_copies_dicts_and_reads_files() -> None:
    original = _config("MGUPLion")
    loaded = load_config(original)
    loaded["optimizer"]["params"]["lr"] = 1.0
    assert original["optimizer"]["params"]["lr"] == 0.01
    path = CONFIG_DIR / "zero2_mgup_adamw_fp32.json"
    assert load_config(str(path)) == json.loads(path.read_text())
    with pytest.raises(TypeError, match="dict or a path"):
        load_config(42)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"fp16": {"enabled": True}}, "fp16"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        ({"zero_optimization": {"offload_param": {"device": "nvme"}}}, "offload_param"),
        ({"zero_optimization": {"zenflow": {}}}, "zenflow"),
    ],
)
def test_unsupported_deepspeed_features_are_named(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_supported(config)


def test_supported_features_pass() -> None:
    zero = {"stage": 3, "offload_optimizer": {"device": "none"}}
    check_supported({"bf16": {"enabled": True}, "fp16": {"enabled": False}, "zero_optimization": zero})


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_config_selects_what_its_name_says(path: Any) -> None:
    """``zero<stage>_<optimizer>_<fp32|bf16>.json``; each is also trained by tests/integrations/test_deepspeed.py."""
    stage, name, precision = re.fullmatch(r"zero(\d)_(\w+)_(fp32|bf16)\.json", path.name).groups()
    config = load_config(str(path))
    assert optimizer_spec(config).cls is OPTIMIZERS[name]
    assert config["zero_optimization"]["stage"] == int(stage)
    assert config.get("bf16", {}).get("enabled", False) == (precision == "bf16")
    settings(config)
    check_supported(config)
