"""Muon, MGUPMuon and MARSM against the float64 reference and torch.optim.Muon; matrix/AdamW routing."""
import pytest
import torch

from mgup_dist import MGUPMuon, Muon
from tests.optim.stepping import apply_grads, make_params, reference_errors, run_package
from tests.reference.cases import gradient_sequence, initial_params

COMMON = {"lr": 1e-2, "weight_decay": 0.1}
VARIANTS = [
    ("muon", {}),
    ("muon", {"nesterov": False, "momentum": 0.8, "ns_steps": 3}),
    ("mgup_muon", {}),
    ("mgup_muon", {"mask_ratio": 0.7, "alpha": 1.5, "gamma": 0.5, "adamw_betas": (0.9, 0.95)}),
    ("mars_m", {}),
    ("mars_m", {"gamma": 0.1, "momentum": 0.9}),
    ("mgup_muon", {"nesterov": False, "mask_ratio": 0.3}),
]


@pytest.mark.parametrize("name, hparams", VARIANTS)
def test_matches_float64_reference_with_float32_newton_schulz(name: str, hparams: dict) -> None:
    """ns_dtype=float32 against the reference's fp64 NS: NS agrees to ~1e-6 relative, masks (decided before
    NS on float64 inputs) exactly; mixed shapes incl. 4-D conv and a tie-heavy matrix."""
    errors = reference_errors(name, package_only={"ns_dtype": torch.float32}, **COMMON, **hparams)
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("name, hparams", VARIANTS[::2])
def test_matches_float64_reference_with_default_bfloat16_newton_schulz(name: str, hparams: dict) -> None:
    """Default bf16 NS: its output differs from fp64 NS by ~3–5e-2 relative (tests/rules/test_newton_schulz.py),
    so the 5-step displacement is compared at 6e-2; a flipped mask decision would cost far more."""
    errors = reference_errors(name, **COMMON, **hparams)
    assert max(errors) <= 6e-2, errors


@pytest.mark.parametrize("nesterov", [True, False])
def test_agrees_with_torch_muon_match_rms_adamw(nesterov: bool) -> None:
    """torch.optim.Muon(adjust_lr_fn="match_rms_adamw") uses Moonlight's 0.2·sqrt(max(A, B)) scale and the same
    decoupled decay. Its conventions differ from ours in ways NS5's scale invariance absorbs:
    - momentum is Keller's EMA ``buf.lerp_(g, 1−μ)`` (Nesterov input ``g.lerp(buf, μ)``), which is exactly
      (1−μ) times Moonlight's sum momentum ``M ← μM + G`` (Nesterov input ``G + μM``), spec §1.5;
    - it normalises by ``max(‖X‖_F, 1e-7)`` instead of ``‖X‖_F + 1e-7``;
    - it always iterates in bf16 and writes the step with addmm (same coefficients (3.4445, −4.7750, 2.0315)).
    So the momentum buffers agree to rounding after rescaling by (1−μ), and the parameters to bf16 NS tolerance.
    """
    mu = 0.9
    shapes, scales = ((5, 3), (3, 5), (6, 8)), (1.0, 1.0, 1.0)
    values, sequence = initial_params(shapes, seed=3), gradient_sequence(5, shapes, scales, seed=4)
    ours, theirs = make_params(values, torch.float32), make_params(values, torch.float32)
    package = Muon(ours, lr=2e-2, weight_decay=0.1, momentum=mu, nesterov=nesterov)
    baseline = torch.optim.Muon(theirs, lr=2e-2, weight_decay=0.1, momentum=mu, nesterov=nesterov,
                                adjust_lr_fn="match_rms_adamw")
    for grads in sequence:
        apply_grads(package, ours, grads)
        apply_grads(baseline, theirs, grads)
    for a, b, start in zip(ours, theirs, values):
        torch.testing.assert_close(package.state[a]["momentum_buffer"] * (1 - mu),
                                   baseline.state[b]["momentum_buffer"], rtol=1e-5, atol=1e-6)
        moved = (b.detach().double() - start).norm()
        assert (a.detach().double() - b.detach().double()).norm() / moved < 5e-2


@pytest.mark.parametrize("cls", [Muon, MGUPMuon])
def test_group_without_use_muon_routes_by_ndim(cls) -> None:
    """ndim ≥ 2 (incl. 4-D) takes the matrix path (momentum_buffer), the rest flavour-A AdamW (spec §0.4)."""
    params = make_params(initial_params(((4,), (1,), (3, 5), (2, 1, 2, 2))))
    optimizer = cls(params)
    apply_grads(optimizer, params, [torch.ones_like(p) for p in params])
    keys = [set(optimizer.state[p]) for p in params]
    assert keys == [{"step", "exp_avg", "exp_avg_sq"}] * 2 + [{"momentum_buffer"}] * 2


def test_use_muon_group_key_overrides_ndim() -> None:
    """A use_muon=False group sends even matrices to AdamW; use_muon=True sends them to the matrix path."""
    matrix_a, matrix_b = make_params(initial_params(((3, 5), (4, 2))))
    optimizer = Muon([{"params": [matrix_a], "use_muon": False}, {"params": [matrix_b], "use_muon": True}])
    apply_grads(optimizer, [matrix_a, matrix_b], [torch.ones(3, 5), torch.ones(4, 2)])
    assert set(optimizer.state[matrix_a]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(optimizer.state[matrix_b]) == {"momentum_buffer"}


@pytest.mark.parametrize("name, hparams", VARIANTS)
def test_same_bits_with_and_without_native_kernels(name: str, hparams: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Float32 parameters, default bf16 NS, 4 steps: parameters and state identical bit for bit whether the
    native momentum pass and the fused decay/widen/step pass run or the torch operations do."""
    from mgup_dist.native import kernels

    shapes = ((48, 40), (40, 1000), (3000,), (8, 3, 3, 3))
    values, sequence = initial_params(shapes, seed=3), gradient_sequence(4, shapes, (1.0,) * 4, seed=4)
    calls: list[str] = []
    for kernel in ("momentum", "scaled_update"):
        original = getattr(kernels, kernel)
        monkeypatch.setattr(kernels, kernel, lambda *a, _f=original, _k=kernel, **k: (calls.append(_k), _f(*a, **k)))
    runs = []
    for native in ("1", "0"):
        monkeypatch.setenv("MGUP_DIST_NATIVE", native)
        runs.append(run_package(name, values, sequence, dtype=torch.float32, **COMMON, **hparams))
    assert "scaled_update" in calls and ("momentum" in calls) == (name != "mars_m")
    (native_params, native_opt), (portable_params, portable_opt) = runs
    for a, b, start in zip(native_params, portable_params, values):
        assert torch.equal(a, b) and not torch.equal(a, start.float())
        for key, value in native_opt.state[a].items():
            other = portable_opt.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
