"""The byte-level GPT: shapes, tied embeddings, causality, initial loss, parameter routing for Muon."""
from __future__ import annotations

import math

import pytest
import torch

from launch.model import GPT, VOCAB_SIZE, GPTShape
from mgup_dist.optim import muon_param_groups

SHAPE = GPTShape(n_layer=2, n_head=2, n_embd=16, block_size=12)


def test_shapes_and_loss_at_initialisation() -> None:
    model = GPT(SHAPE)
    idx, targets = torch.randint(0, VOCAB_SIZE, (2, 3, 12))
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 12, VOCAB_SIZE)
    # small initial weights give near-uniform predictions: loss on random targets close to ln(256)
    assert abs(loss.item() - math.log(VOCAB_SIZE)) < 0.1
    assert model(idx)[1] is None


def test_embeddings_are_tied_and_counted_once() -> None:
    model = GPT(SHAPE)
    assert model.lm_head.weight is model.wte.weight
    d, layers = SHAPE.n_embd, SHAPE.n_layer
    per_block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    expected = VOCAB_SIZE * d + SHAPE.block_size * d + layers * per_block + 2 * d
    assert model.num_parameters() == expected


def test_attention_is_causal() -> None:
    model = GPT(SHAPE)
    idx = torch.randint(0, VOCAB_SIZE, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % VOCAB_SIZE
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7])
    assert not torch.allclose(before[:, 7:], after[:, 7:])


def test_rejects_too_long_sequences_and_bad_heads() -> None:
    with pytest.raises(ValueError, match="exceeds block_size 12"):
        GPT(SHAPE)(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by n_head"):
        GPT(GPTShape(n_layer=1, n_head=3, n_embd=16, block_size=4))


def test_muon_groups_keep_embeddings_and_vectors_off_the_matrix_path() -> None:
    model = GPT(SHAPE)
    matrix, other = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    matrix_names = {names[id(p)] for p in matrix["params"]}
    assert matrix["use_muon"] and not other["use_muon"]
    assert "wte.weight" not in matrix_names and "wpe.weight" not in matrix_names
    expected = {n for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith(("wpe", "wte"))}
    assert matrix_names == expected
