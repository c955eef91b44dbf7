"""mrgfast's small ViT / ViT3D against an explicit reference forward (reshape patchify, softmax attention)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mrgfast.layers.diagnostic_prefix import DiagnosticPrefix
from mrgfast.models.vit import ViT, ViT3D, sincos_position_embedding
from tests.ops.op_cases import assert_close

DIM, HEADS = 24, 3


def randomise(model):
    """LayerNorm weights away from 1/0 and a nonzero CLS, so their handling shows in the outputs."""
    torch.manual_seed(7)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        if model.cls_token is not None:
            model.cls_token.normal_()
    return model


def reference_forward(model, x):
    """The model's forward written out: patches by reshape + matmul, explicit softmax(q k^T / sqrt(d)) v."""
    batch, channels = x.shape[:2]
    axes = len(model.grid)
    split = [batch, channels] + [n for g, p in zip(model.grid, model.patch_size) for n in (g, p)]
    order = [0] + [2 + 2 * i for i in range(axes)] + [1] + [3 + 2 * i for i in range(axes)]
    patches = x.reshape(split).permute(order).reshape(batch, math.prod(model.grid), -1)
    weight = model.patch_embed.weight.reshape(model.dim, -1)
    tokens = patches @ weight.T + model.patch_embed.bias
    pos = model.pos_embed
    if model.cls_token is not None:
        cls = model.cls_token.expand(batch, 1, model.dim)
        if pos.shape[1] == tokens.shape[1] + 1:  # learnable: CLS has a position too
            tokens = torch.cat([cls, tokens], 1) + pos
        else:
            tokens = torch.cat([cls, tokens + pos], 1)
    else:
        tokens = tokens + pos
    for block in model.blocks:
        h = F.layer_norm(tokens, (model.dim,), block.norm1.weight, block.norm1.bias)
        q, k, v = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).chunk(3, dim=-1)
        heads = block.attn.heads
        q, k, v = (t.reshape(batch, -1, heads, model.dim // heads).transpose(1, 2) for t in (q, k, v))
        scores = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(model.dim // heads), dim=-1)
        attn = (scores @ v).transpose(1, 2).reshape(batch, -1, model.dim)
        tokens = tokens + attn @ block.attn.proj.weight.T + block.attn.proj.bias
        h = F.layer_norm(tokens, (model.dim,), block.norm2.weight, block.norm2.bias)
        fc1, fc2 = block.mlp[0], block.mlp[2]
        tokens = tokens + F.gelu(h @ fc1.weight.T + fc1.bias) @ fc2.weight.T + fc2.bias
    return F.layer_norm(tokens, (model.dim,), model.norm.weight, model.norm.bias)


def check_against_reference(model, x, dtype):
    """Forward, input gradient and (fp32) every parameter gradient of `model` in `dtype` vs the fp32 reference."""
    reference = copy.deepcopy(model)
    model = model.to(dtype)
    x_ref = x.clone().requires_grad_()
    x_model = x.to(dtype).requires_grad_()
    out = model(x_model)
    expected = reference_forward(reference, x_ref)
    assert_close(out.features, expected, dtype, "features")
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    out.features.backward(grad.to(dtype))
    expected.backward(grad)
    assert_close(x_model.grad, x_ref.grad, dtype, "d input")
    if dtype == torch.float32:
        theirs = dict(reference.named_parameters())
        for name, param in model.named_parameters():
            assert_close(param.grad, theirs[name].grad, dtype, f"d {name}")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls_token,pos_embed", [(True, "learnable"), (False, "sincos"), (True, "sincos")])
def test_vit_matches_reference(dtype, cls_token, pos_embed):
    torch.manual_seed(0)
    model = randomise(ViT((12, 20), 4, 3, DIM, 2, HEADS, mlp_ratio=2, cls_token=cls_token, pos_embed=pos_embed))
    x = torch.randn(2, 3, 12, 20)
    out = check_against_reference(model, x, dtype)
    assert out.grid == (3, 5) and out.cls == cls_token
    assert out.features.shape == (2, int(cls_token) + 15, DIM) and out.patches.shape == (2, 15, DIM)
    expected_pooled = out.features[:, 0] if cls_token else out.features.mean(1)
    assert torch.equal(out.pooled, expected_pooled)


@pytest.mark.parametrize("pool,pos_embed", [("mean", "learnable"), ("cls", "sincos"), ("cls", "learnable")])
def test_vit3d_matches_reference(pool, pos_embed):
    torch.manual_seed(0)
    model = randomise(ViT3D((4, 6, 10), (2, 3, 5), 1, dim=DIM, depth=2, heads=HEADS, pool=pool, pos_embed=pos_embed))
    x = torch.randn(2, 1, 4, 6, 10)
    out = check_against_reference(model, x, torch.float32)
    assert out.grid == (2, 2, 2) and out.features.shape == (2, 8 + (pool == "cls"), DIM)
    expected_pooled = out.features[:, 0] if pool == "cls" else out.features.mean(1)
    assert_close(out.pooled, expected_pooled, torch.float32, "pooled")


def test_vit3d_embedding_feeds_diagnostic_prefix():
    torch.manual_seed(0)
    encoder = ViT3D((4, 8, 8), 4, dim=DIM, depth=1, heads=HEADS)
    prefix = DiagnosticPrefix(embed_dim=DIM, n_labels=5, llm_dim=16, n_prefix=3, mapper_layers=1, n_heads=2)
    tokens = prefix(encoder(torch.randn(2, 1, 4, 8, 8)).pooled, logits=torch.randn(2, 5))
    assert tokens.shape == (2, 3, 16)


def test_gradient_checkpointing_same_result_and_recomputes():
    torch.manual_seed(0)
    plain = randomise(ViT(16, 4, 3, DIM, 2, HEADS))
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing = True
    calls = []
    mlp_forward = checkpointed.blocks[0].mlp.forward  # counted by wrapping (hooks do not fire on recompute)
    checkpointed.blocks[0].mlp.forward = lambda h: (calls.append(1), mlp_forward(h))[1]
    x = torch.randn(2, 3, 16, 16)
    outputs = []
    for model in (plain, checkpointed):
        features = model(x).features
        features.square().sum().backward()
        outputs.append(features)
    assert_close(outputs[1], outputs[0], torch.float32, "features")
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert_close(b.grad, a.grad, torch.float32, f"d {name}")
    assert len(calls) == 2  # the block ran again in backward
    with torch.no_grad():
        checkpointed(x)  # without grad there is nothing to recompute
    assert len(calls) == 3


def test_sincos_matches_formula():
    grid, dim = (2, 3), 8
    table = sincos_position_embedding(grid, dim)
    quarter = dim // 4
    for index, (row, col) in enumerate((r, c) for r in range(grid[0]) for c in range(grid[1])):
        expected = []
        for coord in (row, col):
            freqs = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
            expected += [math.sin(coord * f) for f in freqs] + [math.cos(coord * f) for f in freqs]
        assert torch.allclose(table[index], torch.tensor(expected), atol=1e-6)
    assert sincos_position_embedding((2, 2, 2), 12).shape == (8, 12)


def test_learnable_positions_are_parameters_sincos_are_not():
    assert isinstance(ViT(8, 4, 3, DIM, 1, HEADS).pos_embed, torch.nn.Parameter)
    model = ViT(8, 4, 3, DIM, 1, HEADS, pos_embed="sincos")
    assert not isinstance(model.pos_embed, torch.nn.Parameter) and "pos_embed" not in model.state_dict()


@pytest.mark.parametrize("build,match", [
    (lambda: ViT(30, 7, 3, DIM, 1, HEADS), "not divisible by patch_size"),
    (lambda: ViT3D((4, 8, 9), 4, dim=DIM, depth=1, heads=HEADS), "not divisible by patch_size"),
    (lambda: ViT(28, 7, 3, 25, 1, HEADS), "divisible by heads"),
    (lambda: ViT(28, 7, 3, DIM, 0, HEADS), "depth"),
    (lambda: ViT(28, 7, 3, DIM, 1, HEADS, pos_embed="rope"), "pos_embed"),
    (lambda: ViT(28, 7, 3, 18, 1, HEADS, pos_embed="sincos"), "divisible by 4"),
    (lambda: ViT3D((4, 8, 8), 4, dim=DIM, depth=1, heads=HEADS, pool="cls", cls_token=False), "cls_token"),
    (lambda: ViT3D((4, 8, 8), 4, dim=DIM, depth=1, heads=HEADS, pool="max"), "pool"),
    (lambda: ViT3D((4, 8), 4, dim=DIM, depth=1, heads=HEADS), "volume_size"),
])
def test_bad_construction_rejected(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_wrong_input_shape_rejected():
    model = ViT(28, 7, 3, DIM, 1, HEADS)
    for bad in (torch.randn(1, 3, 30, 28), torch.randn(1, 1, 28, 28), torch.randn(3, 28, 28)):
        with pytest.raises(ValueError, match="input must be \\[batch, 3, 28, 28\\]"):
            model(bad)
