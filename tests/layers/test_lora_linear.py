"""LoRALinear: output and gradients against the op's reference, PEFT's init and scaling, merge, disable, errors."""

import math

import pytest
import torch
from torch import nn

from mrgfast.layers import LoRALinear
import mrgfast.layers.lora_linear as lora_linear_module
from mrgfast.ops.lora_linear import lora_linear, reference_lora_linear


def make_layer(in_features=24, out_features=20, r=4, bias=True, randomize_b=True, **kwargs):
    """A LoRALinear over a fresh nn.Linear; B is made non-zero so the adapter path is visible."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_features, out_features, bias=bias), r=r, **kwargs)
    if randomize_b:
        with torch.no_grad():
            layer.lora_B.weight.normal_(0.0, 0.5)
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(7,), (2, 3), (1,)])
def test_forward_and_gradients_match_reference(bias, lead):
    layer = make_layer(bias=bias, lora_alpha=12)
    x = torch.randn(*lead, 24, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    x_ref = x.detach().clone().requires_grad_(True)
    a_ref = layer.lora_A.weight.detach().clone().requires_grad_(True)
    b_ref = layer.lora_B.weight.detach().clone().requires_grad_(True)
    y_ref = reference_lora_linear(x_ref, layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
                                  a_ref, b_ref, 12 / 4)
    y_ref.backward(grad_y)

    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, a_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B.weight.grad, b_ref.grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None, "the base weight is frozen"
    assert bias is False or layer.bias.grad is None, "the base bias is frozen"


def test_dropout_p_and_training_flag_reach_the_op(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs["dropout_p"], kwargs["training"]))
        return lora_linear(*args, **kwargs)

    monkeypatch.setattr(lora_linear_module, "lora_linear", spy)
    layer = make_layer(lora_dropout=0.3)
    x = torch.randn(2, 24)
    layer.train()
    layer(x)
    layer.eval()
    layer(x)
    assert calls == [(0.3, True), (0.3, False)]


def test_dropout_acts_only_in_training():
    layer = make_layer(lora_dropout=0.5)
    x = torch.randn(64, 24)
    with torch.no_grad():
        no_drop = reference_lora_linear(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight,
                                        layer.scaling)
        layer.eval()
        torch.testing.assert_close(layer(x), no_drop, rtol=1e-5, atol=1e-5)
        layer.train()
        first, second = layer(x), layer(x)
    assert not torch.allclose(first, no_drop), "dropout had no effect in training mode"
    assert not torch.allclose(first, second), "each training forward draws a new mask"


def test_init_is_peft_default():
    in_features, r = 256, 16
    layer = make_layer(in_features=in_features, r=r, randomize_b=False)
    a = layer.lora_A.weight
    assert torch.count_nonzero(layer.lora_B.weight) == 0, "B must start at zero"
    # kaiming_uniform(a=sqrt(5)) draws from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), whose std is bound/sqrt(3).
    bound = 1.0 / math.sqrt(in_features)
    assert a.abs().max() <= bound
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3)
    assert a.shape == (r, in_features) and layer.lora_B.weight.shape == (20, r)


def test_fresh_layer_equals_base():
    layer = make_layer(randomize_b=False)
    x = torch.randn(5, 24)
    with torch.no_grad():
        # Equal up to kernel rounding: a fused backend computes the base product its own way.
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rslora, expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling_plain_and_rslora(use_rslora, expected):
    layer = make_layer(r=4, lora_alpha=16, use_rslora=use_rslora)
    assert layer.scaling == pytest.approx(expected)
    x = torch.randn(3, 24)
    with torch.no_grad():
        y_ref = reference_lora_linear(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, expected)
        torch.testing.assert_close(layer(x), y_ref, rtol=1e-5, atol=1e-5)


def test_attributes_and_state_dict_keys():
    base = nn.Linear(24, 20)
    parent = nn.Sequential(base)
    keys_before = set(parent.state_dict())
    parent[0] = layer = LoRALinear(base, r=4, lora_alpha=8, lora_dropout=0.1)
    assert layer.weight is base.weight and layer.bias is base.bias, "the base Parameters are reused, not copied"
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert set(parent.state_dict()) == keys_before | {"0.lora_A.weight", "0.lora_B.weight"}
    assert (layer.in_features, layer.out_features, layer.r, layer.lora_alpha) == (24, 20, 4, 8)
    assert layer.lora_dropout == 0.1 and layer.scaling == 2.0
    assert isinstance(layer.lora_A, nn.Linear) and layer.lora_A.bias is None and layer.lora_B.bias is None


def test_merge_unmerge_round_trip_and_merged_forward():
    layer = make_layer()
    x = torch.randn(4, 24)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        assert layer.merged
        torch.testing.assert_close(layer.weight, w0 + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)
        merged = layer(x)
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        # Merged forward is the base linear alone: zeroing B must not change it.
        b0 = layer.lora_B.weight.clone()
        layer.lora_B.weight.zero_()
        assert torch.equal(layer(x), merged)
        layer.lora_B.weight.copy_(b0)
        layer.unmerge()
        layer.merge()
        layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-5)


def test_merge_sums_in_fp32_for_bf16_base():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20).to(torch.bfloat16), r=4, lora_alpha=8)
    assert layer.lora_A.weight.dtype == torch.float32, "half-precision bases get fp32 adapters, as PEFT"
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.5)
    w0 = layer.weight.detach().clone()
    expected = (w0.float() + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).to(torch.bfloat16)
    layer.merge()
    assert layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, expected)


def test_bf16_forward_with_fp32_adapters_matches_reference():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20).to(torch.bfloat16), r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0.0, 0.5)
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        y_ref = reference_lora_linear(x, layer.weight, layer.bias, layer.lora_A.weight, layer.lora_B.weight, 2.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)


def test_explicit_adapter_dtype():
    layer = LoRALinear(nn.Linear(8, 8), r=2, adapter_dtype=torch.float64)
    assert layer.lora_A.weight.dtype == torch.float64 and layer.lora_B.weight.dtype == torch.float64


def test_merge_twice_warns_and_changes_nothing():
    layer = make_layer()
    layer.merge()
    merged = layer.weight.detach().clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, merged)
    layer.unmerge()
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_disabled_adapter_is_exact_base_and_unmerges():
    layer = make_layer()
    x = torch.randn(4, 24)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        base = nn.functional.linear(x, w0, layer.bias)
        with_lora = layer(x)
        layer.enable_adapters(False)
        assert layer.disable_adapters
        assert torch.equal(layer(x), base)
        layer.enable_adapters(True)
        assert torch.equal(layer(x), with_lora)

        layer.merge()
        layer.enable_adapters(False)
        out = layer(x)
    assert not layer.merged, "a disabled forward unmerges first, as PEFT"
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0, -2, 2.0, True])
def test_bad_rank_is_rejected(r):
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRALinear(nn.Linear(8, 8), r=r)


@pytest.mark.parametrize("base", [nn.Conv1d(8, 8, 1), nn.Embedding(8, 8), None])
def test_non_linear_base_is_rejected(base):
    with pytest.raises(ValueError, match="wraps an nn.Linear"):
        LoRALinear(base, r=2)


@pytest.mark.parametrize("kwargs, field", [
    ({"lora_dropout": 1.0}, "lora_dropout"), ({"lora_dropout": -0.1}, "lora_dropout"),
    ({"lora_alpha": 0}, "lora_alpha"), ({"lora_alpha": float("nan")}, "lora_alpha"),
])
def test_bad_hyperparameters_are_rejected(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LoRALinear(nn.Linear(8, 8), r=2, **kwargs)
