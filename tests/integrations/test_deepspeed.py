"""`mgup_dist.deepspeed.initialize` trains to the same parameters as one process, at every ZeRO stage.

Each shipped config in ``configs/deepspeed/`` (and a few layout variants DeepSpeed can produce: round-robin
gradient order, parameter alignment padding, ZeRO-3 sub-groups and ``zero.Init``, the bf16 optimizer with fp32
gradient accumulation, an optimizer passed as a callable) trains the tiny GPT of `deepspeed_harness` for 5
steps on 2 gloo ranks; rank 0 also runs the single-process reference (`train_reference`), which mirrors
DeepSpeed's arithmetic.

Expected equality:

- **bit for bit** for MGUP-AdamW, MGUP-Lion, AlphaAdam (whose aligned count is an exact int64 sum) and
  MGUP-Muon, in fp32 and in bf16: their distributed math is elementwise, an exact top-k or Newton-Schulz on
  the gathered matrix, and the reference reproduces DeepSpeed's bf16 forward, backward and bf16 gradient
  averaging (a sum of two operands, then an exact halving), so nothing is left to rounding order;
- **MARS-M** clips with a float64 norm summed across ranks, in another order than one process sums it:
  masters within 1e-6 relative (as `tests/test_zero.py`), and in bf16 the model's bf16 copies within one bf16
  rounding step (2^-8 relative) of the reference's, since a master that differs in its last fp32 bit can
  round to the neighbouring bf16 value.

The checks cover DeepSpeed's own views: the model's parameters (gathered by DeepSpeed), the fp32 masters
(``safe_get_full_fp32_param``) and, for the Adam family, ``safe_get_full_optimizer_state(p, "exp_avg")``,
which reads our state in DeepSpeed's flat layout. Checkpoints saved with ``engine.save_checkpoint`` resume
bit for bit.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch

import mgup_dist
import mgup_dist.deepspeed
from tests.distributed import run_distributed
from tests.integrations.deepspeed_harness import (
    CONFIG_DIR,
    RUN_OVERRIDES,
    Reference,
    Run,
    batches,
    is_bf16,
    load,
    make_model,
    train_deepspeed,
    train_reference,
)

WORLD = 2
SHIPPED = sorted(path.name for path in CONFIG_DIR.glob("*.json"))
NORM_CROSSING = ("MARSM",)


def _variant(name: str, zero: dict[str, Any] | None = None, **top: Any) -> dict[str, Any]:
    config = load(name)
    config["zero_optimization"].update(zero or {})
    config.update(top)
    return config


FP32_VARIANTS = {
    "zero2 round-robin gradients": _variant("zero2_mgup_muon_fp32.json", {"round_robin_gradients": True}),
    "zero1 parameter alignment": _variant("zero1_alpha_adam_fp32.json", {"parameter_alignment": True}),
    "zero3 sub-groups": _variant("zero3_mgup_muon_fp32.json", {"sub_group_size": 600}),
    "zero3 zero.Init": _variant("zero3_mgup_muon_fp32.json", zero_init=True),
    "zero3 no reduce-scatter": _variant("zero3_mgup_adamw_fp32.json", {"reduce_scatter": False}),
    "zero2 optimizer as a callable": _variant("zero2_mgup_adamw_fp32.json", as_callable=True),
}
BF16_VARIANTS = {
    f"zero1 bf16 fp32-accumulation {name}": _variant(f"zero1_{name}_bf16.json", data_types={"grad_accum_dtype": "fp32"})
    for name in ("mgup_muon", "mgup_adamw")
}


def _train(rank: int, world_size: int, cases: list[tuple[str, dict[str, Any]]]) -> list[tuple[Run, Reference | None]]:
    out = []
    for _, config in cases:
        run = train_deepspeed(rank, world_size, config)
        out.append((run, train_reference(world_size, config) if rank == 0 else None))
    return out


def _assert_matches(label: str, config: dict[str, Any], run: Run, reference: Reference) -> None:
    norm_crossing = config["optimizer"]["type"] in NORM_CROSSING
    want_params = [m.bfloat16().float() if is_bf16(config) else m for m in reference.masters]
    checks = [("parameter", run.params, want_params), ("master", run.masters, reference.masters)]
    if run.exp_avg is not None:
        assert None not in reference.exp_avg, f"{label}: exp_avg where the reference keeps none (routing differs)"
        want_state = [s.reshape(m.shape) for s, m in zip(reference.exp_avg, reference.masters)]
        checks.append(("exp_avg", run.exp_avg, want_state))
    for what, got, want in checks:
        if got is None:
            continue
        assert len(got) == len(want), f"{label}: {len(got)} {what}s, expected {len(want)}"
        for i, (a, b) in enumerate(zip(got, want)):
            where = f"{label}: {what} {i}"
            if not norm_crossing:
                assert torch.equal(a, b), where
            elif what == "parameter" and is_bf16(config):
                torch.testing.assert_close(a, b, rtol=2**-8, atol=1e-6, msg=where)
            else:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=where)


def _check(cases: list[tuple[str, dict[str, Any]]]) -> None:
    results = run_distributed(WORLD, _train, cases)
    for index, (label, config) in enumerate(cases):
        reference = results[0][index][1]
        for rank in range(WORLD):
            run = results[rank][index][0]
            _assert_matches(f"{label} rank {rank}", config, run, reference)
            stage = config["zero_optimization"]["stage"]
            assert stage == 0 or run.split_tensors > 0, f"{label}: no tensor straddles ranks"


def _shipped(suffix: str) -> list[tuple[str, dict[str, Any]]]:
    return [(name, load(name)) for name in SHIPPED if name.endswith(suffix)]


def test_shipped_fp32_configs_and_layout_variants_match_single_process() -> None:
    _check(_shipped("_fp32.json") + list(FP32_VARIANTS.items()))


def test_shipped_bf16_configs_match_single_process() -> None:
    _check(_shipped("_bf16.json") + list(BF16_VARIANTS.items()))


def _resume(rank: int, world_size: int, cases: list[dict[str, Any]], directory: str) -> list:
    out = []
    for i, config in enumerate(cases):
        run = train_deepspeed(rank, world_size, config, checkpoint=(f"{directory}/{i}", 3))
        out.append((run, train_reference(world_size, config) if rank == 0 else None))
    return out


def test_deepspeed_checkpoints_resume_bit_for_bit() -> None:
    """Save after 3 steps, load into a fresh engine, 2 more steps: the same as 5 uninterrupted steps. AlphaAdam
    with ``alpha_ema`` keeps a per-tensor scalar (``alpha_bar``) beside the step counters."""
    ema = {"alpha_ema": 0.5}
    cases = [
        _variant("zero0_mgup_muon_bf16.json"),
        _variant("zero1_mars_m_bf16.json", data_types={"grad_accum_dtype": "fp32"}),
        _variant("zero2_alpha_adam_fp32.json"),
        _variant("zero3_alpha_adam_bf16.json"),
    ]
    for config in cases[2:]:
        config["optimizer"]["params"].update(ema)
    with tempfile.TemporaryDirectory() as directory:
        results = run_distributed(WORLD, _resume, cases, directory)
    for index, config in enumerate(cases):
        for rank in range(WORLD):
            _assert_matches(f"resume case {index} rank {rank}", config, results[rank][index][0], results[0][index][1])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"fp16": {"enabled": True}}, "fp16 is not supported"),
        ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}, "offload_optimizer"),
        ({"optimizer": {"type": "MARSM", "params": {"lr": 0.01, "is_approx": False}}}, "MARS exact mode"),
        ({"optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "mgup_dist": {}}, "selects no mgup_dist optimizer"),
    ],
)
def test_unsupported_settings_fail_before_deepspeed_starts(change: dict[str, Any], message: str) -> None:
    config = {**load("zero2_mgup_adamw_fp32.json"), **change}
    with pytest.raises(ValueError, match=message):
        mgup_dist.deepspeed.initialize(model=make_model(), config=config)


def test_config_optimizer_and_optimizer_argument_are_exclusive() -> None:
    model, config = make_model(), load("zero1_mgup_adamw_fp32.json")
    with pytest.raises(ValueError, match="pass only one"):
        mgup_dist.deepspeed.initialize(model=model, optimizer=mgup_dist.AdamW(model.parameters()), config=config)


def test_parameters_tagged_for_deepspeed_muon_are_rejected() -> None:
    model = make_model()
    model.blocks[0].qkv.weight.use_muon = True
    with pytest.raises(ValueError, match="use_muon attribute"):
        mgup_dist.deepspeed.initialize(model=model, config=load("zero2_mgup_muon_fp32.json"))


def _guard_worker(rank: int, world_size: int, configs: list[dict[str, Any]]) -> list[list[tuple[int, int, bool]]]:
    return [_guard_steps(rank, world_size, config) for config in configs]


def _guard_steps(rank: int, world_size: int, config: dict[str, Any]) -> list[tuple[int, int, bool]]:
    """A finite step, then a step whose loss (so every gradient) is NaN. Per step: the all-reduces our
    `Collectives` made, the optimizer's ``skipped_steps`` after it, and whether the parameters stayed unchanged."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    engine = mgup_dist.deepspeed.initialize(model=make_model(), config={**config, **RUN_OVERRIDES})[0]
    optimizer = engine.optimizer.optimizer
    comm = optimizer.distributor.ops.comm
    out = []
    for step, scale in enumerate((1.0, float("nan"))):
        before = [p.detach().clone() for p in engine.module.parameters()]
        comm.reset_stats()
        engine.backward(engine(batches(world_size)[step][rank]) * scale)
        engine.step()
        unchanged = all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
        out.append((comm.stats["all_reduce"].calls, optimizer.skipped_steps, unchanged))
    return out


def test_zero2_guard_trusts_deepspeeds_finite_norm_and_checks_otherwise() -> None:
    """At ZeRO-2 DeepSpeed all-reduces the gradient norm before our ``step()``: a finite norm vouches for every
    gradient, so our non-finite guard adds no all-reduce. A NaN step in fp32 is skipped by DeepSpeed itself
    (our optimizer never runs); in bf16 with ``check_grad_overflow`` off DeepSpeed goes on, and our guard
    checks and skips it, once per param group (DeepSpeed calls ``step()`` per group)."""
    optimizer = {"type": "mgup_dist.Muon", "params": {"lr": 0.002, "weight_decay": 0.1}}
    fp32 = {**load("zero2_mgup_muon_fp32.json"), "optimizer": optimizer, "gradient_clipping": 0.0}
    bf16 = {**fp32, "bf16": {"enabled": True, "check_grad_overflow": False}}
    for rank, per_config in enumerate(run_distributed(WORLD, _guard_worker, [fp32, bf16])):
        assert per_config[0] == [(0, 0, False), (0, 0, True)], f"fp32, rank {rank}: {per_config[0]}"
        assert per_config[1] == [(0, 0, False), (2, 2, True)], f"bf16, rank {rank}: {per_config[1]}"
