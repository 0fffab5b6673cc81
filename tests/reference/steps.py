"""One reference step of each update rule on one whole float64 tensor, written from spec §1–§5.

Each function takes the parameter `theta` (updated in place), its gradient `g`, the tensor's `state` dict
(filled on first use) and the group's hyperparameters `hp`.
"""
import math

import torch

from tests.reference.masks import aligned_fraction, alpha_factors, cautious_factors, dynamic_alpha, mgup_factors
from tests.reference.newton_schulz import newton_schulz5


def decay(theta: torch.Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled decay θ ← θ·(1 − η·λ) with the unscaled group lr (§0.2)."""
    if weight_decay != 0:
        theta.mul_(1.0 - lr * weight_decay)


def _zeros(state: dict, key: str, like: torch.Tensor) -> torch.Tensor:
    if key not in state:
        state[key] = torch.zeros_like(like)
    return state[key]


def adam_moments(g: torch.Tensor, state: dict, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """t ← t+1; m ← β1·m + (1−β1)·g; v ← β2·v + (1−β2)·g²; returns (m, v)."""
    state["step"] = state.get("step", 0) + 1
    m = _zeros(state, "exp_avg", g)
    v = _zeros(state, "exp_avg_sq", g)
    m.copy_(betas[0] * m + (1 - betas[0]) * g)
    v.copy_(betas[1] * v + (1 - betas[1]) * g * g)
    return m, v


def flavour_a_step_size(lr: float, betas: tuple[float, float], t: int, correct_bias: bool) -> float:
    """η·sqrt(1−β2^t)/(1−β1^t) if correct_bias else η (§1.1)."""
    if not correct_bias:
        return lr
    return lr * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)


def masked_adam(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict, mask: str) -> None:
    """Flavour-A AdamW (§1.1) with the MGUP (§2.3), CMGUP (§2.4) or no ("none") mask."""
    decay(theta, hp["lr"], hp["weight_decay"])
    m, v = adam_moments(g, state, hp["betas"])
    u = m / (v.sqrt() + hp["eps"])
    if mask == "mgup":
        phi = mgup_factors(u, g, hp["mask_ratio"], hp["alpha"], hp["gamma"])
    elif mask == "cmgup":
        phi = cautious_factors(u, g, hp["alpha"], hp["gamma"])
    else:
        phi = torch.ones_like(u)
    step_size = flavour_a_step_size(hp["lr"], hp["betas"], state["step"], hp["correct_bias"])
    theta.sub_(step_size * (u * phi))


def alpha_adam(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict) -> None:
    """AlphaAdam, the project definition of §3.2."""
    if hp["score_source"] == "momentum":
        scores = _zeros(state, "exp_avg", g) * g
    decay(theta, hp["lr"], hp["weight_decay"])
    m, v = adam_moments(g, state, hp["betas"])
    u = m / (v.sqrt() + hp["eps"])
    if hp["score_source"] == "update":
        scores = u * g
    previous = state.get("alpha_bar", 1.0)
    alpha_bar = dynamic_alpha(aligned_fraction(scores), hp["alpha_min"], hp["alpha_ema"], previous)
    if hp["alpha_ema"] > 0:
        state["alpha_bar"] = alpha_bar
    phi = alpha_factors(scores, alpha_bar, u.dtype)
    step_size = flavour_a_step_size(hp["lr"], hp["betas"], state["step"], hp["correct_bias"])
    theta.sub_(step_size * (u * phi))


def lion(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict, masked: bool) -> None:
    """Lion (§1.2), or MGUP-Lion (§2.5) when `masked`: score c·g."""
    beta1, beta2 = hp["betas"]
    decay(theta, hp["lr"], hp["weight_decay"])
    m = _zeros(state, "exp_avg", g)
    c = torch.sign(beta1 * m + (1 - beta1) * g)
    phi = mgup_factors(c, g, hp["mask_ratio"], hp["alpha"], hp["gamma"]) if masked else torch.ones_like(c)
    theta.sub_(hp["lr"] * (c * phi))
    m.copy_(beta2 * m + (1 - beta2) * g)


def matrix_view(t: torch.Tensor) -> torch.Tensor:
    """The (shape[0], prod(shape[1:])) view of a ≥2-D tensor (§0.4)."""
    return t.reshape(t.shape[0], -1)


def moonlight_apply(theta: torch.Tensor, ortho: torch.Tensor, phi: torch.Tensor, hp: dict) -> None:
    """θ ← θ·(1−ηλ); θ ← θ − η·0.2·sqrt(max(A, B))·(O ⊙ Φ) on the matrix view (§1.4)."""
    rows, cols = matrix_view(theta).shape
    decay(theta, hp["lr"], hp["weight_decay"])
    scale = 0.2 * math.sqrt(max(rows, cols))
    theta.sub_(hp["lr"] * scale * (ortho * phi).reshape(theta.shape))


def muon_matrix(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict, masked: bool) -> None:
    """Moonlight Muon's matrix path (§1.5), or MGUP-Muon's (§2.6) when `masked` (score N·G before NS)."""
    grad = matrix_view(g)
    buf = _zeros(state, "momentum_buffer", grad)
    buf.copy_(hp["momentum"] * buf + grad)
    n = grad + hp["momentum"] * buf if hp["nesterov"] else buf.clone()
    phi = mgup_factors(n, grad, hp["mask_ratio"], hp["alpha"], hp["gamma"]) if masked else torch.ones_like(n)
    moonlight_apply(theta, newton_schulz5(n, hp["ns_steps"]), phi, hp)


def mars_m_matrix(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict) -> None:
    """MARS-M's matrix path (§5.2): corrected, clipped, EMA momentum, NS5, Moonlight scale."""
    grad = matrix_view(g)
    mu = hp["momentum"]
    last = matrix_view(_zeros(state, "last_grad", g))
    c = grad + hp["gamma"] * mu / (1 - mu) * (grad - last)
    norm = torch.linalg.matrix_norm(c, ord="fro").item()
    if norm > 1:
        c = c / norm
    buf = _zeros(state, "momentum_buffer", grad)
    buf.copy_(mu * buf + (1 - mu) * c)
    moonlight_apply(theta, newton_schulz5(buf, hp["ns_steps"]), torch.ones_like(buf), hp)
    if hp["is_approx"]:
        last.copy_(grad)


def muon_adamw_path(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict) -> None:
    """The Muon family's AdamW path: flavour A with adamw_betas/adamw_eps, bias-corrected, unmasked (§0.4)."""
    path = dict(hp, betas=hp["adamw_betas"], eps=hp["adamw_eps"], correct_bias=True)
    masked_adam(theta, g, state, path, mask="none")


def mars_adamw(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict) -> None:
    """MARS-AdamW (§4.2) on an original-2-D tensor (or any tensor with optimize_1d)."""
    beta1, beta2 = hp["betas"]
    last = _zeros(state, "last_grad", g)
    c = g + hp["gamma"] * beta1 / (1 - beta1) * (g - last)
    norm = torch.linalg.vector_norm(c).item()
    if norm > 1:
        c = c / norm
    m, v = adam_moments(c, state, hp["betas"])
    if hp["amsgrad"]:
        v_max = _zeros(state, "max_exp_avg_sq", v)
        v_max.copy_(torch.maximum(v_max, v))
        v = v_max
    t = state["step"]
    denom = (v.sqrt() / math.sqrt(1 - beta2**t) + hp["eps"]) * (1 - beta1**t)
    decay(theta, hp["lr"], hp["weight_decay"])
    theta.sub_(hp["lr"] * m / denom)
    if hp["is_approx"]:
        last.copy_(g)


def torch_style_adamw(theta: torch.Tensor, g: torch.Tensor, state: dict, lr: float, betas, eps, wd) -> None:
    """Flavour-B AdamW (torch.optim.AdamW): θ ← θ·(1−η·λ) − η·m̂/(sqrt(v̂) + ε)."""
    m, v = adam_moments(g, state, betas)
    t = state["step"]
    m_hat = m / (1 - betas[0] ** t)
    v_hat = v / (1 - betas[1] ** t)
    decay(theta, lr, wd)
    theta.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def mars_fallback(theta: torch.Tensor, g: torch.Tensor, state: dict, hp: dict, lr_ratio: float) -> None:
    """MARS-AdamW's non-2-D branch (§4.4): torch AdamW on raw g with lr·lr_1d/lr_ctor, betas_1d, wd_1d."""
    torch_style_adamw(theta, g, state, hp["lr"] * lr_ratio, hp["betas_1d"], hp["eps"], hp["weight_decay_1d"])
    if hp["is_approx"]:
        _zeros(state, "last_grad", g).copy_(g)
