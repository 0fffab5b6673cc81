"""`muon_param_groups`: the standard matrix-path / AdamW-path split of a model (spec §0.4)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_HEAD_NAMES = ("lm_head", "head", "output")


def _excluded(model: nn.Module) -> set[int]:
    """ids of parameters kept off the matrix path: embeddings, tied heads, and the last head-named Linear."""
    excluded: set[int] = set()
    embedding_weights: set[int] = set()
    last_head: nn.Linear | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            excluded.update(id(p) for p in module.parameters(recurse=False))
            embedding_weights.add(id(module.weight))
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1].lower() in _HEAD_NAMES:
            last_head = module
    for module in model.modules():
        if isinstance(module, nn.Linear) and id(module.weight) in embedding_weights:
            excluded.add(id(module.weight))
    if last_head is not None:
        excluded.add(id(last_head.weight))
    return excluded


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """``param``'s real shape: ``ds_shape`` once DeepSpeed ZeRO-3 has partitioned it (under ``zero.Init`` the
    tensor itself is 1-D), else ``shape``."""
    return tuple(int(d) for d in getattr(param, "ds_shape", param.shape))


def muon_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``[{"params": [...], "use_muon": True}, {"params": [...], "use_muon": False}]`` over the trainable
    parameters of ``model``, each listed once; empty groups omitted. A parameter takes the matrix path iff its
    `logical_shape` has ``ndim ≥ 2`` and it is not an embedding, a head tied to one, or the last
    ``lm_head``/``head``/``output``."""
    excluded = _excluded(model)
    matrix: list[torch.nn.Parameter] = []
    other: list[torch.nn.Parameter] = []
    for param in model.parameters():  # parameters() already de-duplicates tied tensors
        if not param.requires_grad:
            continue
        (matrix if len(logical_shape(param)) >= 2 and id(param) not in excluded else other).append(param)
    groups = [{"params": matrix, "use_muon": True}, {"params": other, "use_muon": False}]
    return [group for group in groups if group["params"]]
