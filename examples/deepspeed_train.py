"""Train a tiny GPT with an mgup_dist optimizer selected in a DeepSpeed JSON config.

    torchrun --standalone --nproc_per_node 2 examples/deepspeed_train.py \
        --deepspeed_config configs/deepspeed/zero2_mgup_muon_bf16.json
    deepspeed --num_gpus 2 examples/deepspeed_train.py --deepspeed_config configs/deepspeed/zero3_mgup_adamw_fp32.json
    mpirun -np 2 python examples/deepspeed_train.py --deepspeed_config configs/deepspeed/zero1_alpha_adam_fp32.json

The only change from a plain DeepSpeed script is ``mgup_dist.deepspeed.initialize`` in place of
``deepspeed.initialize``. Rank 0 prints the loss of every step; at the end every rank prints a checksum of the
model's parameters (identical on all ranks when the run is consistent); the ranks then leave the process group
together and exit without interpreter teardown (see `mgup_dist.process_exit`).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import mgup_dist.deepspeed
from mgup_dist.process_exit import exit_without_teardown

VOCAB, WIDTH, HEADS, TIME = 64, 32, 4, 16


class TinyGPT(nn.Module):
    """Embeddings, one pre-norm causal self-attention + MLP block, tied head; returns the next-token loss."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, WIDTH), nn.Embedding(TIME, WIDTH)
        self.norm_1, self.norm_2, self.norm_f = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        for embedding in (self.embed, self.pos):
            nn.init.normal_(embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(t, device=tokens.device))
        q, k, v = (y.view(b, t, HEADS, -1).transpose(1, 2) for y in self.qkv(self.norm_1(x)).split(WIDTH, dim=2))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, WIDTH)
        x = x + self.proj(attended)
        logits = self.head(self.norm_f(x + self.mlp(self.norm_2(x))))
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


def _batch(engine: object, step: int) -> torch.Tensor:
    """Sequences that repeat a random pattern: learnable, so the loss visibly falls."""
    gen = torch.Generator().manual_seed(1000 * step + engine.global_rank)
    period = torch.randint(2, 5, (1,), generator=gen).item()
    pattern = torch.randint(0, VOCAB, (engine.train_micro_batch_size_per_gpu(), period), generator=gen)
    return pattern.repeat(1, TIME // period + 1)[:, :TIME].to(engine.device)


def _checksum(engine: object) -> float:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return sum(float(p.detach().double().sum()) for p in params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON naming an mgup_dist optimizer")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    engine, _, _, _ = mgup_dist.deepspeed.initialize(args=args, model=TinyGPT())
    if engine.global_rank == 0:
        print(f"optimizer {type(engine.basic_optimizer).__name__}, ZeRO stage {engine.zero_optimization_stage()}, "
              f"world size {engine.world_size}", flush=True)
    for step in range(args.steps):
        loss = engine(_batch(engine, step))
        engine.backward(loss)
        engine.step()
        if engine.global_rank == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    print(f"rank {engine.global_rank} checksum {_checksum(engine):.12e}", flush=True)
    engine.destroy()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    exit_without_teardown()  # gloo's threads can abort Python's teardown: see mgup_dist.process_exit


if __name__ == "__main__":
    main()
