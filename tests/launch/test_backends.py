"""Backend registry: implemented backends build, known-but-missing ones fail early with one clear message."""
from __future__ import annotations

import pytest
import torch

import mgup_dist

from launch.backends import KNOWN_BACKENDS, backend_class
from launch.backends.base import Backend
from launch.backends.registry import register
from launch.dist_env import detect
from launch.errors import LaunchError
from launch.model import GPT, GPTShape

ONE = detect(None, {})
TWO = detect(None, {"RANK": "0", "WORLD_SIZE": "2"})


@pytest.mark.parametrize("name", KNOWN_BACKENDS)
def test_every_known_backend_is_implemented(name: str) -> None:
    assert backend_class(name).name == name


def test_unknown_backend() -> None:
    with pytest.raises(LaunchError, match="unknown backend 'horovod'"):
        backend_class("horovod")


def test_single_refuses_several_ranks_and_options() -> None:
    with pytest.raises(LaunchError, match="backend single runs one process, but this launch has world_size 2"):
        backend_class("single")(TWO, {})
    with pytest.raises(LaunchError, match=r"unknown backend_options \['stage'\] for backend single; valid: none"):
        backend_class("single")(ONE, {"stage": 2})


def test_ddp_option_validation() -> None:
    with pytest.raises(LaunchError, match="bucket_cap_mb must be a number > 0"):
        backend_class("ddp")(ONE, {"bucket_cap_mb": 0})
    with pytest.raises(LaunchError, match="valid: bucket_cap_mb"):
        backend_class("ddp")(ONE, {"bucket": 1})


def test_single_engine_steps_and_clips() -> None:
    torch.manual_seed(0)
    model = GPT(GPTShape(n_layer=1, n_head=1, n_embd=8, block_size=4))
    engine = backend_class("single")(ONE, {}).build(model, lambda m: mgup_dist.Lion(m.parameters(), lr=0.1))
    before = model.wte.weight.detach().clone()
    idx = torch.randint(0, 256, (2, 4))
    with engine.micro_step(sync=True):
        engine.model(idx, idx)[1].backward()
    norm = engine.clip_grad_norm(1e-3)
    clipped = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters()))
    assert norm > 1e-3 and float(clipped) == pytest.approx(1e-3, rel=1e-4)
    engine.step()
    engine.zero_grad()
    assert not torch.equal(before, model.wte.weight) and model.wte.weight.grad is None
    state = engine.state_dict()
    assert "model.lm_head.weight" in state and "optim.state.wte.weight.exp_avg" in state


def test_register_rejects_names_outside_the_schema() -> None:
    class Rogue(Backend):
        name = "rogue"

        def build(self, model, make_optimizer):  # type: ignore[no-untyped-def]
            raise AssertionError

    with pytest.raises(ValueError, match="not in KNOWN_BACKENDS"):
        register(Rogue)


def test_zero_option_validation() -> None:
    with pytest.raises(LaunchError, match=r"backend_options.stage must be one of \[1, 2\], got 3"):
        backend_class("zero")(ONE, {"stage": 3})
    with pytest.raises(LaunchError, match="backend_options.layout must be one of"):
        backend_class("zero")(ONE, {"layout": "diagonal"})
    with pytest.raises(LaunchError, match="gather_max_numel must be null or an integer >= 1"):
        backend_class("zero")(ONE, {"gather_max_numel": 0})
