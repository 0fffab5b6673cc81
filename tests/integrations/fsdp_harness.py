"""Training harness for the FSDP2 tests: a tiny GPT-like model, its data, and FSDP2 vs single-process runs.

Runs happen inside `tests.distributed.run_distributed` workers (gloo, one thread per rank). Every rank builds
the same model from a seed, keeps a plain deep copy as the single-process reference, shards the original with
``fully_shard`` and steps both with the same optimizer class.

Gradient modes (``mode``):

- ``"exact"``: every rank computes the loss of the whole global batch; global rank 0 back-propagates it
  scaled by the data-parallel size ``D`` (a power of two), the others scaled by 0. FSDP2 averages: the
  reduce-scatter sums ``D·g`` with exact zeros and divides by a power of two (and HSDP's replicate all-reduce
  does the same), all exact in floating point, so the optimizer sees bitwise the gradient the reference
  computes on the whole batch, at any world size or mesh. Parameters can then be compared bit for bit.
- ``"split"``: each rank back-propagates the mean loss of its own micro-batch (realistic data parallelism).
  FSDP2's cross-rank sum has its own summation order, so its averaged gradient equals the reference's average
  of the per-micro-batch gradients only to rounding (`RunResult.grad_error`); the reference optimizer then
  steps FSDP2's own averaged gradient (an exact copy, via ``full_tensor``), so the parameters still compare
  bit for bit.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import mgup_dist
from tests.integrations.tiny_block import Block

VOCAB, WIDTH, HEADS, BLOCK, HIDDEN = 13, 6, 2, 5, 10
BATCH = 4
EXTRA_SHAPE = (3, 4)
SEED = 1234


class TinyGPT(nn.Module):
    """One pre-norm transformer block with untied embeddings, an LM head and a scalar value head.

    Row counts 13, 18, 10, 6, 5 and 1 shard unevenly over 2 and 4 ranks, down to empty trailing shards.
    """

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.wpe = nn.Embedding(BLOCK, WIDTH)
        self.block = Block(WIDTH, HEADS, HIDDEN)
        self.ln_f = nn.LayerNorm(WIDTH)
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.value = nn.Linear(WIDTH, 1)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy plus a small value-head penalty (a scalar loss)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        h = self.ln_f(self.block(x))
        loss = F.cross_entropy(self.lm_head(h).view(-1, VOCAB), targets.reshape(-1))
        return loss + 0.1 * self.value(h).square().mean()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: ``BATCH`` sequences of ``BLOCK`` tokens and their targets."""
    gen = torch.Generator().manual_seed(SEED + step)
    tokens = torch.randint(0, VOCAB, (BATCH, BLOCK + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


OPTIMIZERS: dict[str, Callable[[Any], mgup_dist.optim.RuleOptimizer]] = {
    "mgup_adamw": lambda model: mgup_dist.MGUPAdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
    "mgup_muon": lambda model: mgup_dist.MGUPMuon(mgup_dist.muon_param_groups(model), lr=1e-2),
    "alpha_adam": lambda model: mgup_dist.AlphaAdam(model.parameters(), lr=1e-2, weight_decay=0.1),
    "mars_m": lambda model: mgup_dist.MARSM(mgup_dist.muon_param_groups(model), lr=1e-2),
}


def make_mesh(shape: tuple[int, ...]) -> DeviceMesh:
    """A CPU mesh; 2-D meshes are HSDP ``(replicate, shard)``."""
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def shard_model(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` on the block and the root: HSDP on a 2-D mesh, FSDP on a 1-D one."""
    fully_shard(model.block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for DTensors: every rank must call it)."""
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().clone()


@dataclass
class RunResult:
    """Rank-local outcome of one run: final parameters by name (FSDP2 and reference), the distributor type,
    and the largest relative gap between FSDP2's averaged gradient and the reference's (``"split"`` mode)."""

    fsdp: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor]
    distributor: str
    grad_error: float = 0.0


class Run:
    """One optimizer trained under FSDP2 on ``mesh`` beside its single-process reference."""

    def __init__(
        self, name: str, mesh: DeviceMesh, mode: str = "exact", init_seed: int = SEED, plain_extra: bool = False
    ) -> None:
        torch.manual_seed(init_seed)
        model = TinyGPT()
        self.reference = copy.deepcopy(model)
        self.model = shard_model(model, mesh)
        self.optimizer = OPTIMIZERS[name](self.model)
        self.reference_optimizer = OPTIMIZERS[name](self.reference)
        self.mode = mode
        self.dp_size = mesh.size()
        self.grad_error = 0.0
        # A plain (non-DTensor) matrix beside the FSDP2 parameters, with the same gradient on every rank.
        self.extras = [nn.Parameter(torch.randn(EXTRA_SHAPE)) for _ in range(2)] if plain_extra else []
        if self.extras:
            self.extras[1].data.copy_(self.extras[0].data)
            self.optimizer.add_param_group({"params": [self.extras[0]]})
            self.reference_optimizer.add_param_group({"params": [self.extras[1]]})

    def _fsdp_backward(self, step: int) -> None:
        idx, targets = batch(step)
        if self.mode == "exact":
            scale = float(self.dp_size) if dist.get_rank() == 0 else 0.0
            (self.model(idx, targets) * scale).backward()
            return
        micro = BATCH // self.dp_size
        mine = slice(dist.get_rank() * micro, (dist.get_rank() + 1) * micro)
        self.model(idx[mine], targets[mine]).backward()

    def _reference_grads(self, step: int) -> None:
        idx, targets = batch(step)
        if self.mode == "exact":
            self.reference(idx, targets).backward()
            return
        micro = BATCH // self.dp_size
        grads = []
        for r in range(self.dp_size):
            self.reference.zero_grad(set_to_none=True)
            self.reference(idx[r * micro : (r + 1) * micro], targets[r * micro : (r + 1) * micro]).backward()
            grads.append([p.grad.clone() for p in self.reference.parameters()])
        for p, fsdp_p, per_rank in zip(self.reference.parameters(), self.model.parameters(), zip(*grads)):
            average = torch.stack(per_rank).sum(0) / self.dp_size
            reduced = full(fsdp_p.grad)
            scale = average.abs().max().clamp_min(1e-30)
            self.grad_error = max(self.grad_error, ((reduced - average).abs().max() / scale).item())
            p.grad = reduced  # the reference steps exactly the gradient FSDP2's optimizer sees

    def step(self, step: int) -> None:
        """One training step of both runs on ``batch(step)``."""
        self._fsdp_backward(step)
        self._reference_grads(step)
        gen = torch.Generator().manual_seed(SEED - step)
        extra_grad = torch.randn(EXTRA_SHAPE, generator=gen)
        for extra in self.extras:
            extra.grad = extra_grad.clone()
        for optimizer in (self.optimizer, self.reference_optimizer):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def save(self, path: str) -> None:
        """DCP checkpoint of the FSDP2 model and optimizer (sharded DTensor state). Collective."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)

    def load(self, path: str) -> None:
        """Loads a `save` checkpoint (any world size or mesh) into the FSDP2 model and optimizer, and the
        same weights and state into the reference (which holds plain tensors). Collective."""
        for model, optimizer in ((self.model, self.optimizer), (self.reference, self.reference_optimizer)):
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)

    def result(self) -> RunResult:
        """Final parameters of both runs (collective: gathers the FSDP2 shards)."""
        fsdp = {name: full(p) for name, p in self.model.named_parameters()}
        reference = {name: full(p) for name, p in self.reference.named_parameters()}
        if self.extras:
            fsdp["plain_extra"], reference["plain_extra"] = (full(p) for p in self.extras)
        return RunResult(fsdp, reference, type(self.optimizer.distributor).__name__, self.grad_error)


def state_snapshot(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    """``{"<param>.<key>": whole value}`` of the optimizer state, DTensors gathered (collective)."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(param)]}.{key}"] = full(value) if torch.is_tensor(value) else value
    return out


def state_is_dtensor(optimizer: torch.optim.Optimizer) -> dict[str, bool]:
    """For each state key seen, whether every per-element (non-scalar) entry is a DTensor placed like its
    parameter (``step`` and other scalars are reported separately as ``scalar:<key>``)."""
    seen: dict[str, bool] = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                ok = isinstance(value, DTensor) and tuple(value.placements) == tuple(param.placements)
                ok = ok and value.shape == param.shape
                seen[key] = seen.get(key, True) and ok
            else:
                seen[f"scalar:{key}"] = not isinstance(value, DTensor)
    return seen
