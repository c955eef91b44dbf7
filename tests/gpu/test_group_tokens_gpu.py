"""Token grouping and the fused grouped projection on a real GPU: every backend (cuda, triton) vs the reference."""

import pytest
import torch

from mrgfast.ops.group_tokens import group_layout, group_tokens, reference_group_tokens
from mrgfast.ops.grouped_projection import grouped_projection, reference_grouped_projection
from tests.ops.lora_cases import assert_close

GPU_BACKENDS = ["triton", "cuda"]  # on a GPU machine a missing CUDA build must fail, not skip

# (batch, tokens, dim, out, group, mode, grid, pad): PeFoMed (EVA 1024 x 1408 -> 256 x 4096), Qwen2-VL's 2x2
# merge of a 32 x 32 grid, and odd sizes with padding.
SHAPES = [
    (2, 1024, 1408, 4096, 4, "1d", None, False),
    (2, 1024, 1280, 3584, 4, "2d", (32, 32), False),
    (3, 31 * 33, 72, 333, 4, "2d", (31, 33), True),
    (1, 1023, 40, 65, 4, "1d", None, True),
    (2, 25 * 26, 136, 100, 9, "2d", (25, 26), True),
]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,tokens,dim,out,group,mode,grid,pad", SHAPES)
def test_group_tokens_exact_on_gpu(monkeypatch, backend, dtype, batch, tokens, dim, out, group, mode, grid, pad):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    x = torch.randn(batch, tokens, dim, device="cuda").to(dtype).requires_grad_()
    layout = group_layout(x.shape, group, mode, grid, pad)
    y = group_tokens(x, group, mode, grid, pad)
    assert torch.equal(y, reference_group_tokens(x.detach(), layout))
    grad = torch.randn(y.shape, device="cuda").to(dtype)
    x_ref = x.detach().clone().requires_grad_()
    want = torch.autograd.grad(reference_group_tokens(x_ref, layout), x_ref, grad)[0]
    assert torch.equal(torch.autograd.grad(y, x, grad)[0], want)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,tokens,dim,out,group,mode,grid,pad", SHAPES)
@pytest.mark.parametrize("train_x", [False, True], ids=["frozen_x", "train_x"])
def test_grouped_projection_on_gpu(monkeypatch, backend, dtype, batch, tokens, dim, out, group, mode, grid, pad,
                                   train_x):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    x = (rand(batch, tokens, dim) * 2 + 0.5).to(dtype).requires_grad_(train_x)
    weight = (rand(out, group * dim) / (group * dim) ** 0.5).to(dtype).requires_grad_()
    bias = rand(out).to(dtype).requires_grad_()
    gamma = (1 + 0.3 * rand(dim)).to(dtype).requires_grad_(train_x)
    beta = (0.3 * rand(dim)).to(dtype).requires_grad_(train_x)
    tensors = [t for t in (x, weight, bias, gamma, beta) if t.requires_grad]
    y = grouped_projection(x, weight, bias, group, mode, grid, pad, norm_weight=gamma, norm_bias=beta)
    grad_y = rand(*y.shape).to(dtype)
    grads = torch.autograd.grad(y, tensors, grad_y)
    as32 = [t.detach().float().requires_grad_(t.requires_grad) for t in (x, weight, bias, gamma, beta)]
    layout = group_layout(x.shape, group, mode, grid, pad)
    y_ref = reference_grouped_projection(as32[0], as32[1], as32[2], layout, True, as32[3], as32[4])
    grads_ref = torch.autograd.grad(y_ref, [t for t in as32 if t.requires_grad], grad_y.float())
    assert_close(y, y_ref, dtype, "y")
    names = [n for n, t in zip(("dx", "dW", "db", "dgamma", "dbeta"), (x, weight, bias, gamma, beta))
             if t.requires_grad]
    for name, got, want in zip(names, grads, grads_ref):
        assert_close(got, want, dtype, name)


def test_triton_projection_is_deterministic():
    x = torch.randn(2, 1024, 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4096, 4 * 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gamma = torch.ones(1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    runs = [torch.autograd.grad(grouped_projection(x, w, None, 4, norm_weight=gamma).float().square().sum(),
                                (x, w, gamma)) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(*runs))
