"""group_tokens on every backend: PeFoMed's view, hand-written 2d orders, padding, exact gradients, bad input."""

import pytest
import torch

from mrgfast.ops.group_tokens import group_layout, group_tokens, reference_group_tokens
from tests.ops.op_cases import BACKENDS, GPU_BACKENDS, use_backend

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])

# (batch, tokens, dim, group, mode, grid, pad): none of them a multiple of the kernels' row/feature blocks.
CASES = [
    (2, 35, 7, 4, "2d", (5, 7), True),
    (3, 24, 40, 4, "2d", (6, 4), False),
    (1, 35, 5, 9, "2d", (7, 5), True),
    (2, 11, 72, 4, "1d", None, True),
    (2, 36, 3, 9, "2d", (6, 6), False),
    (0, 12, 4, 4, "2d", (3, 4), True),
]


def grid_tokens(batch, tokens, dim):
    """x[b, t, d] = 1000 b + 10 t + d + 1: every value names its source, 0 is free for padding."""
    b = torch.arange(batch).view(-1, 1, 1) * 1000
    t = torch.arange(tokens).view(1, -1, 1) * 10
    return (b + t + torch.arange(dim).view(1, 1, -1) + 1).float()


def test_1d_is_pefomeds_view_and_free():
    x = torch.randn(2, 16, 6)
    y = group_tokens(x, 4)
    assert torch.equal(y, x.view(2, 16 // 4, 6 * 4))
    assert y.data_ptr() == x.data_ptr() and y._base is x  # a view: no copy, no kernel


@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_order_is_row_major_blocks_of_row_col_neighbours(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = torch.arange(16.0).view(1, 16, 1)  # a 4 x 4 grid of token ids
    want = torch.tensor([[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]).float()
    assert torch.equal(group_tokens(x, 4, "2d", (4, 4))[0], want)
    # Features of a token stay together; neighbours are concatenated in (row, col) order.
    two = grid_tokens(1, 8, 2)  # a 2 x 4 grid, token t has features (10t + 1, 10t + 2)
    assert torch.equal(group_tokens(two, 4, "2d", (2, 4))[0],
                       torch.tensor([[1, 2, 11, 12, 41, 42, 51, 52], [21, 22, 31, 32, 61, 62, 71, 72]]).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_goes_to_the_bottom_and_right_of_the_grid_and_the_end_in_1d(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = torch.arange(1.0, 10.0).view(1, 9, 1)  # 3 x 3 grid holding 1..9
    want = torch.tensor([[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]).float()
    assert torch.equal(group_tokens(x, 4, "2d", (3, 3), pad=True)[0], want)
    ones = torch.arange(1.0, 6.0).view(1, 5, 1)
    assert torch.equal(group_tokens(ones, 2, pad=True)[0], torch.tensor([[1, 2], [3, 4], [5, 0]]).float())


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("batch,tokens,dim,group,mode,grid,pad", CASES)
def test_matches_reference_exactly_with_inverse_permutation_gradient(monkeypatch, backend, dtype, batch, tokens,
                                                                     dim, group, mode, grid, pad):
    use_backend(monkeypatch, backend)
    x = grid_tokens(batch, tokens, dim).to(dtype).requires_grad_()
    y = group_tokens(x, group, mode, grid, pad)
    want = reference_group_tokens(x.detach(), group_layout(x.shape, group, mode, grid, pad))
    assert y.dtype == dtype and torch.equal(y, want)  # a permutation: bit-exact in every dtype
    grad = torch.randn(y.shape).to(dtype)
    (dx,) = torch.autograd.grad(y, x, grad)
    x_ref = x.detach().clone().requires_grad_()
    (dx_ref,) = torch.autograd.grad(reference_group_tokens(x_ref, group_layout(x.shape, group, mode, grid, pad)),
                                    x_ref, grad)
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x = torch.randn(2, 7, 25).transpose(1, 2)  # [2, 25, 7], not contiguous
    layout = group_layout(x.shape, 4, "2d", (5, 5), pad=True)
    assert torch.equal(group_tokens(x, 4, "2d", (5, 5), pad=True), reference_group_tokens(x, layout))
    assert torch.equal(group_tokens(x[:, :24], 4), x[:, :24].reshape(2, 6, 28))


@pytest.mark.parametrize("args,message", [
    (dict(group=4), "N=10 tokens is not divisible by group=4"),
    (dict(group=4, mode="2d", grid=(2, 5)), "h=2, w=5 is not divisible"),
    (dict(group=4, mode="2d", grid=(3, 4)), "grid=(3, 4) holds 12 tokens but x has N=10"),
    (dict(group=3, mode="2d", grid=(2, 5)), "group must be a square"),
    (dict(group=4, mode="2d"), "needs grid=(h, w)"),
    (dict(group=4, mode="3d"), "mode must be '1d' or '2d'"),
    (dict(group=2, grid=(2, 5)), "grid is only used with mode='2d'"),
    (dict(group=0), "group must be a positive integer"),
])
def test_bad_arguments_raise_value_errors(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        group_tokens(torch.zeros(1, 10, 3), **args)


def test_wrong_number_of_dims_raises():
    with pytest.raises(ValueError, match=r"x must be \[batch, tokens, dim\]"):
        group_tokens(torch.zeros(10, 3), 2)


# GPU: every GPU backend on a real GPU against the reference (test_grouped_projection.py runs these shapes too).
# (batch, tokens, dim, out, group, mode, grid, pad): PeFoMed (EVA 1024 x 1408 -> 256 x 4096), Qwen2-VL's 2x2
# merge of a 32 x 32 grid, and odd sizes with padding.
GPU_SHAPES = [
    (2, 1024, 1408, 4096, 4, "1d", None, False),
    (2, 1024, 1280, 3584, 4, "2d", (32, 32), False),
    (3, 31 * 33, 72, 333, 4, "2d", (31, 33), True),
    (1, 1023, 40, 65, 4, "1d", None, True),
    (2, 25 * 26, 136, 100, 9, "2d", (25, 26), True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,tokens,dim,out,group,mode,grid,pad", GPU_SHAPES)
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
