"""Megatron-core's own ``GPTModel`` behind the launcher's model interface (used by backend ``megatron``).

`MegatronGPT(shape)(idx, targets)` behaves like `launch.model.GPT`: ``idx`` int64 ``(batch, time)`` byte ids,
``targets`` the same shape or ``None``; returns ``(logits, loss)`` with the mean cross-entropy over all positions
(logits are ``None`` when targets are given: Megatron fuses the head with the loss). The model is Megatron's
GPT with its local (non-Transformer-Engine) layer spec: pre-norm blocks, causal attention, learned absolute
positions, tied input/output embeddings, GELU MLP of width ``4 * n_embd``, no dropout. Weights are initialised
on the CPU from torch's default generator (``use_cpu_initialization``), so every rank builds the same model
from the same seed. Requires megatron-core (``pip install -e ".[megatron]"``) and an initialised
``megatron.core.parallel_state``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from launch.model import VOCAB_SIZE, GPTShape


def transformer_config(shape: GPTShape, dtype: torch.dtype = torch.float32) -> Any:
    """Megatron's ``TransformerConfig`` for ``shape`` (see the module docstring for the architecture)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=shape.n_layer,
        hidden_size=shape.n_embd,
        num_attention_heads=shape.n_head,
        ffn_hidden_size=4 * shape.n_embd,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        use_cpu_initialization=True,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
    )


class MegatronGPT(nn.Module):
    """``module``: Megatron's ``GPTModel`` (a backend may replace it by a wrapper with the same forward, e.g.
    Megatron's ``DistributedDataParallel``); ``config``: its ``TransformerConfig``."""

    def __init__(self, shape: GPTShape, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

        self.shape = shape
        self.config = transformer_config(shape, dtype)
        self.module: nn.Module = GPTModel(
            config=self.config,
            transformer_layer_spec=get_gpt_layer_local_spec(),
            vocab_size=VOCAB_SIZE,
            max_sequence_length=shape.block_size,
            share_embeddings_and_output_weights=True,
            position_embedding_type="learned_absolute",
        )

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        batch, time = idx.shape
        if time > self.shape.block_size:
            raise ValueError(f"sequence length {time} exceeds block_size {self.shape.block_size}")
        positions = torch.arange(time, device=idx.device).unsqueeze(0).expand(batch, time)
        if targets is None:
            return self.module(idx, positions, None), None
        losses = self.module(idx, positions, None, labels=targets)  # (batch, time) per-token cross-entropy
        return None, losses.float().mean()

    def num_parameters(self) -> int:
        """Trainable parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())
