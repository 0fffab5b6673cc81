"""The pre-norm transformer block shared by the integration harnesses' tiny GPT-like models."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-norm block: causal self-attention (written out, so it runs the same in fp32 and bf16 on CPU) then a
    GELU MLP, each residual. ``width`` must divide by ``heads``."""

    def __init__(self, width: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.fc_out = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(self.width, dim=2)
        q, k, v = (y.view(b, t, self.heads, self.width // self.heads).transpose(1, 2) for y in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (self.width // self.heads) ** -0.5
        att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, self.width))
        return x + self.fc_out(F.gelu(self.fc(self.ln_2(x))))
