"""Behaviour every optimizer shares (RuleOptimizer, spec §0.2, §8 items 24 and 28): closures, lr schedules,
skipped params, checkpoints, decoupled weight decay."""
import io

import pytest
import torch

from mgup_dist import build_optimizer
from tests.optim.stepping import apply_grads, make_params, run_package
from tests.reference.cases import OPTIMIZER_NAMES, gradient_sequence, initial_params

EXTRA = {"alpha_adam": {"alpha_ema": 0.5}}


def _hparams(name: str) -> dict:
    return {"lr": 1e-2, "weight_decay": 0.1, **EXTRA.get(name, {})}


def _roundtrip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize(
    "dtype, grad_dtype",
    [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-params-fp32-grads"],
)
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_roundtrip_continues_bit_identically(name: str, dtype: torch.dtype, grad_dtype) -> None:
    """Save mid-run (through torch.save), load into a fresh optimizer over copies of the params, and both runs
    continue bitwise equal. State dtypes and values survive: MARS's last_grad stays float32 beside bf16 params,
    and with float32 gradients (Parameter.grad_dtype) every float32 state tensor loads unrounded, although
    torch's own load_state_dict casts state to the parameter dtype."""
    values, sequence = initial_params(), gradient_sequence(6)
    params, optimizer = run_package(name, values, sequence[:3], dtype, grad_dtype, **_hparams(name))
    saved = _roundtrip(optimizer.state_dict())
    resumed_params = make_params([p.detach() for p in params], dtype, grad_dtype)
    resumed = build_optimizer(name, resumed_params, **_hparams(name))
    resumed.load_state_dict(saved)
    for a, b in zip(params, resumed_params):
        _assert_same_state(optimizer.state[a], resumed.state[b])
    for grads in sequence[3:]:
        apply_grads(optimizer, params, grads)
        apply_grads(resumed, resumed_params, grads)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
        _assert_same_state(optimizer.state[a], resumed.state[b])
        if "last_grad" in optimizer.state[a]:
            assert optimizer.state[a]["last_grad"].dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)


def _assert_same_state(state_a: dict, state_b: dict) -> None:
    assert state_a.keys() == state_b.keys()
    for key, value in state_a.items():
        if torch.is_tensor(value):
            assert value.dtype == state_b[key].dtype, key
            assert torch.equal(value, state_b[key]), key
        else:
            assert value == state_b[key], key


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_step_runs_closure_under_grad_and_returns_its_value(name: str) -> None:
    param = torch.nn.Parameter(torch.ones(3, 4))
    optimizer = build_optimizer(name, [param])

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (param * torch.arange(12.0).reshape(3, 4)).sum()
        loss.backward()
        return loss

    before = param.detach().clone()
    assert optimizer.step(closure).item() == 66.0
    assert optimizer.step() is None
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_changed_group_lr_takes_effect_on_next_step(name: str) -> None:
    """Group lr is read at each step: set to 0 after step 2, step 3 leaves every tensor (decay included) as it
    was; set back, step 4 moves every tensor again."""
    values, sequence = initial_params(), gradient_sequence(4)
    params, optimizer = run_package(name, values, sequence[:2], **_hparams(name))
    frozen = [p.detach().clone() for p in params]
    optimizer.param_groups[0]["lr"] = 0.0
    apply_grads(optimizer, params, sequence[2])
    assert all(torch.equal(p, f) for p, f in zip(params, frozen))
    optimizer.param_groups[0]["lr"] = 1e-2
    apply_grads(optimizer, params, sequence[3])
    assert all(not torch.equal(p, f) for p, f in zip(params, frozen))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_lambda_lr_scheduler_drives_the_group_lr(name: str) -> None:
    """LambdaLR rewrites group['lr'] each epoch and the next step uses it: the scheduled run equals a run whose
    lr is set by hand to the same values, and the factor 0 of the third epoch freezes the params."""
    values, sequence = initial_params(), gradient_sequence(3)
    params, optimizer = run_package(name, values, [], **_hparams(name))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: [1.0, 0.5, 0.0][epoch])
    apply_grads(optimizer, params, sequence[0])
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 5e-3
    apply_grads(optimizer, params, sequence[1])
    scheduler.step()
    frozen = [p.detach().clone() for p in params]
    apply_grads(optimizer, params, sequence[2])
    assert all(torch.equal(p, f) for p, f in zip(params, frozen))

    twin_params, twin = run_package(name, values, [], **_hparams(name))
    apply_grads(twin, twin_params, sequence[0])
    twin.param_groups[0]["lr"] = 5e-3
    apply_grads(twin, twin_params, sequence[1])
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_param_without_grad_keeps_state_and_step_count(name: str) -> None:
    values, sequence = initial_params(), gradient_sequence(3)
    params, optimizer = run_package(name, values, sequence[:2], **_hparams(name))
    skipped = params[2]
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[skipped].items()}
    value_before = skipped.detach().clone()
    grads = list(sequence[2])
    grads[2] = None
    apply_grads(optimizer, params, grads)
    assert torch.equal(skipped, value_before)
    after = optimizer.state[skipped]
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) if torch.is_tensor(v) else after[k] == v for k, v in before.items())


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_sparse_gradient_raises(name: str) -> None:
    param = torch.nn.Parameter(torch.ones(4, 3))
    optimizer = build_optimizer(name, [param])
    param.grad = torch.ones(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_weight_decay_is_unscaled_and_separate_from_the_update(name: str) -> None:
    """§8.24: every update term depends on the gradients only, so θ_t(θ0) = θ0·(1−ηλ)^t + θ_t(0) exactly in
    exact arithmetic. Any scaling of the decay by a mask, α/γ/Φ, bias correction or 0.2·√max breaks it.
    (MARS's non-2-D fallback decays with weight_decay_1d and lr·lr_1d/lr, here equal to lr.)"""
    lr, wd = 0.05, 0.5
    values, sequence = initial_params(), gradient_sequence(3)
    hp = {"lr": lr, "weight_decay": wd}
    if name in ("muon", "mgup_muon", "mars_m"):
        hp["ns_dtype"] = torch.float32
    if name == "mars_adamw":
        hp.update(weight_decay_1d=wd, lr_1d=lr)
    decayed, _ = run_package(name, values, sequence, **hp)
    from_zero, _ = run_package(name, [torch.zeros_like(v) for v in values], sequence, **hp)
    for p, z, v in zip(decayed, from_zero, values):
        torch.testing.assert_close(p.detach(), v * (1 - lr * wd) ** 3 + z.detach(), rtol=1e-12, atol=1e-13)


def test_parameters_swapped_in_by_an_engine_are_refused() -> None:
    """Plain deepspeed.initialize replaces param_groups' params with flat partitions; stepping those as whole
    tensors would silently compute per-partition masks, so the local distributor refuses them."""
    import mgup_dist

    weight = torch.nn.Parameter(torch.randn(4, 3))
    opt = mgup_dist.MGUPAdamW([weight])
    flat = torch.nn.Parameter(weight.detach().reshape(-1)[:6].clone())
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match="never added through add_param_group"):
        opt.step()
