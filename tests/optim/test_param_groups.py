"""`muon_param_groups` on a small GPT with a tied lm_head (spec §0.4, §8 item 27)."""
import torch
from torch import nn

from mgup_dist import Muon, muon_param_groups


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 11, width: int = 8, layers: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(16, width)
        self.h = nn.ModuleList(Block(width) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight


def test_tied_gpt_split() -> None:
    model = TinyGPT()
    model.h[1].c_fc.bias.requires_grad_(False)
    groups = muon_param_groups(model)
    assert [g["use_muon"] for g in groups] == [True, False]
    matrix, other = ({id(p) for p in g["params"]} for g in groups)
    block_weights = {id(m.weight) for b in model.h for m in (b.c_attn, b.c_proj, b.c_fc)}
    assert matrix == block_weights
    assert {id(model.wte.weight), id(model.wpe.weight)} <= other
    listed = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(listed) == len(set(listed)) == len(trainable) and set(listed) == trainable
    assert id(model.h[1].c_fc.bias) not in set(listed)
    assert all(p.ndim < 2 for p in groups[1]["params"] if id(p) not in {id(model.wte.weight), id(model.wpe.weight)})


def test_untied_head_named_lm_head_is_excluded() -> None:
    model = TinyGPT()
    model.lm_head.weight = nn.Parameter(torch.randn(11, 8))
    matrix, other = ({id(p) for p in g["params"]} for g in muon_param_groups(model))
    assert id(model.lm_head.weight) in other and id(model.lm_head.weight) not in matrix


def test_groups_drive_a_muon_optimizer_and_accept_extra_keys() -> None:
    model = TinyGPT()
    groups = muon_param_groups(model)
    groups[1]["lr"] = 3e-3
    optimizer = Muon(groups)
    loss = model.lm_head(model.h[0].c_fc(model.wte(torch.tensor([1, 2])))[..., :8]).sum()
    loss.backward()
    optimizer.step()
    assert set(optimizer.state[model.h[0].c_fc.weight]) == {"momentum_buffer"}
    assert set(optimizer.state[model.wte.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    assert optimizer.param_groups[1]["lr"] == 3e-3
