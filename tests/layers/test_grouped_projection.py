"""GroupedProjection against the eager nn.LayerNorm -> grouping -> nn.Linear modules it replaces."""

import pytest
import torch
from torch import nn

from mrgfast.layers.grouped_projection import GroupedProjection
from mrgfast.ops.group_tokens import group_layout, reference_group_tokens
from tests.ops.op_cases import BACKENDS, assert_close, use_backend


def eager_twin(layer: GroupedProjection):
    """nn.LayerNorm and nn.Linear holding copies of the layer's weights (what PeFoMed runs)."""
    norm = None
    if layer.norm is not None:
        norm = nn.LayerNorm(layer.in_dim, eps=layer.eps)
        norm.load_state_dict(layer.norm.state_dict())
    proj = nn.Linear(layer.proj.in_features, layer.out_dim, bias=layer.proj.bias is not None)
    proj.load_state_dict(layer.proj.state_dict())
    return norm, proj


def randomise(layer: GroupedProjection) -> GroupedProjection:
    """Norm weights away from 1/0, so their handling shows in the outputs."""
    torch.manual_seed(3)
    if layer.norm is not None:
        with torch.no_grad():
            layer.norm.weight.normal_(1.0, 0.2)
            layer.norm.bias.normal_(0.0, 0.2)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,grid,pad,norm,bias", [
    ("1d", None, False, "layernorm", True),   # PeFoMed
    ("2d", (3, 5), True, "layernorm", True),  # Qwen2-VL merge on an odd grid
    ("2d", (4, 4), False, None, False),
])
def test_matches_eager_modules(monkeypatch, backend, mode, grid, pad, norm, bias):
    use_backend(monkeypatch, backend)
    torch.manual_seed(0)
    tokens = grid[0] * grid[1] if grid else 12
    layer = randomise(GroupedProjection(40, 33, 4, mode=mode, norm=norm, bias=bias, pad=pad))
    eager_norm, eager_proj = eager_twin(layer)
    x = torch.randn(2, tokens, 40, requires_grad=True)
    x_eager = x.detach().clone().requires_grad_()
    y = layer(x, grid=grid)
    h = eager_norm(x_eager) if eager_norm is not None else x_eager
    y_eager = eager_proj(reference_group_tokens(h, group_layout(x.shape, 4, mode, grid, pad)))
    assert_close(y, y_eager, torch.float32, "y")
    grad = torch.randn(y.shape)
    y.backward(grad)
    y_eager.backward(grad)
    assert_close(x.grad, x_eager.grad, torch.float32, "dx")
    eager_params = [p for m in (eager_norm, eager_proj) if m is not None for p in m.parameters()]
    pairs = list(zip(layer.parameters(), eager_params))
    assert len(pairs) == (2 if norm else 0) + (2 if bias else 1)
    for mine, theirs in pairs:
        assert_close(mine.grad, theirs.grad, torch.float32, "parameter grad")


def test_frozen_norm_and_input_get_no_gradients():
    layer = randomise(GroupedProjection(24, 10, 4))
    layer.norm.requires_grad_(False)  # PeFoMed: ln_vision belongs to the frozen ViT
    x = torch.randn(1, 8, 24)
    layer(x).sum().backward()
    assert layer.norm.weight.grad is None and layer.norm.bias.grad is None
    assert layer.proj.weight.grad is not None and layer.proj.bias.grad is not None


def test_grid_at_construction_or_call_and_state_dict_keys():
    layer = GroupedProjection(8, 6, 4, mode="2d", grid=(2, 4))
    x = torch.randn(1, 8, 8)
    assert torch.equal(layer(x), layer(x, grid=(2, 4)))
    assert layer(x.view(1, 8, 8), grid=(4, 2)).shape == (1, 2, 6)
    assert set(layer.state_dict()) == {"norm.weight", "norm.bias", "proj.weight", "proj.bias"}
    assert layer.norm.eps == 1e-5  # nn.LayerNorm's default, as EVA's ln_vision in PeFoMed / MiniGPT-v2


@pytest.mark.parametrize("kwargs,message", [
    (dict(group=3, mode="2d"), "group must be a square"),
    (dict(group=4, norm="rmsnorm"), "norm must be 'layernorm' or None"),
    (dict(group=4, mode="2d", grid=(3, 5)), "not divisible"),
    (dict(group=0), "group must be a positive integer"),
    (dict(group=4, mode="diag"), "mode must be '1d' or '2d'"),
])
def test_bad_construction_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupedProjection(8, 6, **kwargs)


def test_2d_without_grid_or_with_wrong_features_raises():
    with pytest.raises(ValueError, match=r"needs grid=\(h, w\)"):
        GroupedProjection(8, 6, 4, mode="2d")(torch.randn(1, 16, 8))
    with pytest.raises(ValueError, match=r"weight must be \[out, group \* D\]"):
        GroupedProjection(8, 6, 4, norm=None)(torch.randn(1, 16, 7))
