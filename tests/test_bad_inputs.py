"""Bad inputs across the package, one table: optimizers, layouts, the ZeRO engine, launcher configs, the CLI and
checkpoints. Each case names the exact exception type and a distinctive part of its message, and fails before
any work starts."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import mgup_dist
from launch import pretrain
from launch.config import parse_config
from launch.errors import LaunchError
from mgup_dist.checkpoint import (
    CheckpointIntegrityError, load_optimizer_state_dict, model_state_dict, optimizer_state_dict, save_atomic,
)
from mgup_dist.manifest import MANIFEST
from mgup_dist.shard.layout import ShardLayout, flat_layout
from mgup_dist.zero import ZeroEngine
from tests.launch.conftest import NANO_RUN, merged


def _params() -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(3, 4)), nn.Parameter(torch.zeros(4))]


def _opt(name: str = "adamw", **hp: Any) -> Callable[[], Any]:
    return lambda: mgup_dist.build_optimizer(name, _params(), **hp)


def _swapped_groups() -> None:
    a, b = _params()
    saved = mgup_dist.build_optimizer("adamw", [{"params": [a]}, {"params": [b]}])
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    saved.step()
    mgup_dist.build_optimizer("adamw", [{"params": [b]}, {"params": [a]}]).load_state_dict(saved.state_dict())


def _group_count() -> None:
    a, b = _params()
    saved = mgup_dist.build_optimizer("adamw", [{"params": [a]}, {"params": [b]}]).state_dict()
    mgup_dist.build_optimizer("adamw", [a, b]).load_state_dict(saved)


def _nonfinite_policy() -> None:
    mgup_dist.build_optimizer("adamw", _params()).nonfinite = "ignore"


def _zero(**kw: Any) -> Callable[[], Any]:
    def build() -> None:
        model = nn.Linear(2, 2)
        optimizer = kw.pop("optimizer", None) or mgup_dist.build_optimizer("adamw", model.parameters())
        ZeroEngine(model, optimizer, **kw)
    return build


def _config(**overrides: Any) -> Callable[[], Any]:
    return lambda: parse_config(merged(NANO_RUN, overrides))


CASES: dict[str, tuple[Callable[[], Any], type[BaseException], str]] = {
    # optimizers
    "lr string": (_opt(lr="0.1"), ValueError, "lr must be a number, got '0.1'"),
    "lr NaN": (_opt(lr=float("nan")), ValueError, "lr must be finite, got nan"),
    "lr tensor": (_opt(lr=torch.tensor(0.1)), ValueError, "lr must be a number"),
    "negative weight decay": (_opt("lion", weight_decay=-1), ValueError, "weight_decay must be >= 0, got -1"),
    "beta NaN": (_opt(betas=(0.9, float("nan"))), ValueError, "betas[1] must be finite, got nan"),
    "one beta": (_opt(betas=(0.9,)), ValueError, "betas must be a pair (beta1, beta2)"),
    "mask ratio above 1": (_opt("mgup_adamw", mask_ratio=1.5), ValueError, "mask_ratio must be in [0, 1], got 1.5"),
    "ns_steps float": (_opt("muon", ns_steps=2.0), ValueError, "ns_steps must be an integer >= 1, got 2.0"),
    "unknown hyperparameter": (_opt(lrr=1), TypeError, "AdamW got unexpected hyperparameter(s) ['lrr']"),
    "unknown optimizer": (_opt("adam9"), ValueError, "unknown optimizer 'adam9'"),
    "params not tensors": (lambda: mgup_dist.build_optimizer("adamw", [1, 2]), TypeError, "can only optimize Tensors"),
    "no params": (lambda: mgup_dist.build_optimizer("adamw", []), ValueError, "empty parameter list"),
    "nonfinite policy": (_nonfinite_policy, ValueError, "non-finite gradient policy must be one of ('skip', 'raise')"),
    "load: other group count": (_group_count, ValueError, "different number of parameter groups"),
    "load: swapped groups": (_swapped_groups, ValueError,
                             "has shape (3, 4), but this optimizer's parameter 0 has shape (4,)"),
    # layouts and the ZeRO engine
    "layout misses elements": (lambda: ShardLayout(((4,),), (((0, 2),), ((3, 4),))), ValueError,
                               "elements [2, 3) are held by no rank"),
    "layout overlaps": (lambda: ShardLayout(((4,),), (((0, 3),), ((2, 4),))), ValueError,
                        "ranks 0 and 1 both hold [2, 3)"),
    "layout negative shape": (lambda: ShardLayout(((-2, 3),), (((0, 0),),)), ValueError,
                              "shape of tensor 0 must be a sequence of integers >= 0, got (-2, 3)"),
    "layout float shape": (lambda: ShardLayout(((2.5,),), (((0, 2),),)), ValueError, "got (2.5,)"),
    "layout range not a pair": (lambda: ShardLayout(((4,),), (((0, 2, 4),),)), ValueError,
                                "rank 0's range of tensor 0 must be an integer pair"),
    "flat layout zero ranks": (lambda: flat_layout([(4,)], 0), ValueError, "world_size must be a positive int, got 0"),
    "flat layout negative size": (lambda: flat_layout([(-4,)], 2), ValueError, "got (-4,)"),
    "zero stage 3": (_zero(stage=3), ValueError, "ZeRO stage must be one of (1, 2), got 3"),
    "zero layout": (_zero(layout="diagonal"), ValueError, "unknown ZeRO layout 'diagonal'"),
    "zero torch optimizer": (_zero(optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)), TypeError,
                             "ZeroEngine needs an mgup_dist optimizer, got SGD"),
    # launcher configs
    "negative n_layer": (_config(model={"size": "nano", "n_layer": -1}), LaunchError,
                         "model.n_layer must be >= 1, got -1"),
    "steps as string": (_config(train={"steps": "6"}), LaunchError, 'train.steps must be int, got "6"'),
    "steps as bool": (_config(train={"steps": True}), LaunchError, "train.steps must be int, got true"),
    "config lr NaN": (_config(optimizer={"name": "adamw", "lr": float("nan")}), LaunchError,
                      "optimizer: lr must be finite"),
    "grad_clip NaN": (_config(train={"grad_clip": float("nan")}), LaunchError,
                      "train.grad_clip must be a finite float"),
    "zero global batch": (_config(batch={"global_batch": 0}), LaunchError, "batch.global_batch must be >= 1, got 0"),
    "negative keep_last": (_config(train={"keep_last": -1}), LaunchError, "train.keep_last must be >= 0, got -1"),
    "backend options list": (_config(backend_options=[1]), LaunchError, "backend_options must be dict, got [1]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_a_clear_message(case: str) -> None:
    action, error, message = CASES[case]
    with pytest.raises(error, match=re.escape(message)):
        action()


CLI = {
    "negative steps": (["--steps", "-3"], "train.steps must be >= 1, got -3"),
    "negative seed": (["--seed", "-1"], "train.seed must be >= 0, got -1"),
    "steps not a number": (["--steps", "1e3"], "argument --steps: invalid int value: '1e3'"),
    "resume missing folder": (["--resume", "{missing}"], "no checkpoint there"),
}


@pytest.mark.parametrize("case", sorted(CLI))
def test_bad_command_line_exits_2_with_one_line(case: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps(NANO_RUN))
    argv, message = CLI[case]
    argv = [a.format(missing=tmp_path / "nope") for a in argv]
    if "--resume" not in argv:
        argv += ["--config", str(config)]
    assert pretrain.main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_checkpoint_whose_manifest_claims_another_world_size_is_refused(tmp_path: Path) -> None:
    """Loading at another world size is legal; a manifest that disagrees with the files is not: here it claims a
    W=2 save with a second rank's data file that the folder does not hold."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = mgup_dist.build_optimizer("adamw", model.parameters())
    save_atomic({**model_state_dict(model), **optimizer_state_dict(opt, model)}, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["world_size"] = 2
    manifest["files"]["__1_0.distcp"] = dict(manifest["files"]["__0_0.distcp"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointIntegrityError, match=r"file __1_0\.distcp listed in manifest.json is missing"):
        load_optimizer_state_dict(opt, model, tmp_path / "ckpt")
