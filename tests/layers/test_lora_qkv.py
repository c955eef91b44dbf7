"""LoRAQKV fuses q/k/v LoRALinear projections without changing what they compute or how they are named."""

import pytest
import torch
from torch import nn

from mrgfast.layers import LoRALinear
from mrgfast.layers.lora_qkv import LoRAQKV


class Attention(nn.Module):
    """q/k/v projections with HF names, GQA-shaped (k, v narrower than q)."""

    def __init__(self, bias=True):
        super().__init__()
        self.q_proj = nn.Linear(32, 32, bias=bias)
        self.k_proj = nn.Linear(32, 16, bias=bias)
        self.v_proj = nn.Linear(32, 16, bias=bias)


def lora_attention(bias=True, dropout=0.0):
    """Attention whose projections are LoRALinear with non-zero B (so the adapters matter)."""
    torch.manual_seed(0)
    attn = Attention(bias)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = LoRALinear(getattr(attn, name), r=4, lora_alpha=8, lora_dropout=dropout)
        nn.init.normal_(layer.lora_B.weight)
        setattr(attn, name, layer)
    return attn


@pytest.mark.parametrize("bias", [True, False])
def test_fused_equals_separate_projections(bias):
    attn = lora_attention(bias)
    x = torch.randn(2, 7, 32, requires_grad=True)
    separate = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    grads_separate = torch.autograd.grad(sum(t.square().sum() for t in separate),
                                         [x] + [p for p in attn.parameters() if p.requires_grad])
    keys_before = list(attn.state_dict())
    fused = LoRAQKV(attn.q_proj, attn.k_proj, attn.v_proj)(x)
    grads_fused = torch.autograd.grad(sum(t.square().sum() for t in fused),
                                      [x] + [p for p in attn.parameters() if p.requires_grad])
    for got, want in zip(fused, separate):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_fused, grads_separate):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert list(attn.state_dict()) == keys_before


def test_base_weights_become_views_of_one_buffer():
    attn = lora_attention()
    q_weight = attn.q_proj.weight
    LoRAQKV(attn.q_proj, attn.k_proj, attn.v_proj)
    assert attn.q_proj.weight is q_weight, "the Parameter object must be kept"
    base = attn.q_proj.weight.data_ptr()
    assert attn.k_proj.weight.data_ptr() == base + 32 * 32 * 4
    assert attn.v_proj.weight.data_ptr() == base + (32 + 16) * 32 * 4


def test_refuses_after_the_weights_move():
    attn = lora_attention()
    qkv = LoRAQKV(attn.q_proj, attn.k_proj, attn.v_proj)
    attn.to(torch.float64)
    x = torch.randn(3, 32, dtype=torch.float64)
    for got, want in zip(qkv(x), (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want)


def test_disabled_or_merged_adapters_fall_back_to_each_projection():
    attn = lora_attention()
    qkv = LoRAQKV(attn.q_proj, attn.k_proj, attn.v_proj)
    x = torch.randn(5, 32)
    with_lora = qkv(x)
    attn.k_proj.merge()
    for got, want in zip(qkv(x), with_lora):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    attn.k_proj.unmerge()
    base = [nn.functional.linear(x, p.weight, p.bias) for p in qkv.projections]
    for p in qkv.projections:
        p.enable_adapters(False)
    for got, want in zip(qkv(x), base):
        torch.testing.assert_close(got, want)


def test_rejects_projections_that_cannot_share_a_pass():
    attn = lora_attention()
    other = LoRALinear(nn.Linear(20, 16), r=2)
    with pytest.raises(ValueError, match="reads 20 features"):
        LoRAQKV(attn.q_proj, other)
    dropped = LoRALinear(nn.Linear(32, 16), r=2, lora_dropout=0.1)
    with pytest.raises(ValueError, match="share one dropout mask"):
        LoRAQKV(attn.q_proj, dropped)
    with pytest.raises(ValueError, match="two or more LoRALinear"):
        LoRAQKV(attn.q_proj)
