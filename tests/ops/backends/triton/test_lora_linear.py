"""The split LoRA design's pieces in the Triton interpreter: the down kernel, the dropout backward kernel (dx in
place, dA by token ranges), the mask they share, the update order, and agreement with the fused ablation."""

import pytest
import torch

from mrgfast.ops import lora_linear
from mrgfast.ops.backend import triton_interpreting
from tests.ops.op_cases import assert_close, keep_mask_of, use_backend

pytestmark = pytest.mark.triton

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# (tokens, in, r): tokens 1, 37, 129 (several 16-token dA ranges), in not a multiple of 16, r 1..64.
SHAPES = pytest.mark.parametrize("tokens,n_in,rank", [(1, 17, 1), (37, 45, 5), (129, 40, 16), (20, 33, 64)])


@pytest.fixture(autouse=True)
def interpreter():
    if not triton_interpreting():
        pytest.skip("runs the kernels in the Triton interpreter (TRITON_INTERPRET=1)")


def split():
    """The split design's module (imported here: it needs triton)."""
    from mrgfast.ops.backends.triton import lora_linear as split_module
    return split_module


def rand(g, *shape, dtype=torch.float32, scale=1.0):
    """Seeded normal values in `dtype`."""
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


@DTYPES
@SHAPES
def test_down_kernel_is_dropped_x_times_a(dtype, tokens, n_in, rank):
    g = torch.Generator().manual_seed(0)
    x, a = rand(g, tokens, n_in, dtype=dtype), rand(g, rank, n_in, dtype=dtype, scale=0.3)
    u = split().dropped_down(x, a, 0.3, seed=21)
    keep = keep_mask_of("triton", tokens, n_in, 0.3, 21)
    want = (x.float() * keep / 0.7) @ a.float().t()
    assert u.dtype == dtype
    assert_close(u, want, dtype, "u")


@DTYPES
@SHAPES
@pytest.mark.parametrize("parts", ["dx+dA", "dx", "dA"])
def test_dropout_backward_kernel(dtype, tokens, n_in, rank, parts):
    g = torch.Generator().manual_seed(1)
    x, a = rand(g, tokens, n_in, dtype=dtype), rand(g, rank, n_in, dtype=dtype, scale=0.3)
    grad = rand(g, tokens, rank, dtype=dtype)
    dx_before = rand(g, tokens, n_in, dtype=dtype)  # stands for dY W: the kernel adds into it
    dx = dx_before.clone() if "dx" in parts else None
    da = split().dropout_backward(x, grad, a, dx, 0.25, 5, need_a="dA" in parts)
    keep = keep_mask_of("triton", tokens, n_in, 0.25, 5).float()
    if dx is not None:
        assert_close(dx, dx_before.float() + keep * (grad.float() @ a.float()), dtype, "dx")
    if "dA" in parts:
        assert da.dtype == torch.float32  # accumulated over every token in fp32, whatever x's dtype
        assert_close(da, grad.float().t() @ (keep * x.float()), dtype, "dA")
    else:
        assert da is None


def test_forward_and_backward_draw_the_same_mask():
    # With A = I (r = in) the down kernel returns keep * x / (1-p); with one-hot rows of g the backward kernel's
    # dA and dx read the mask back: all three must be the mask triton_keep_mask materialises.
    tokens, n_in, p, seed = 37, 20, 0.4, 77
    x = torch.rand(tokens, n_in) + 1.0  # no zeros: a zero would hide a dropped element
    eye = torch.eye(n_in)
    keep = keep_mask_of("triton", tokens, n_in, p, seed)
    assert 0 < keep.sum() < keep.numel()
    forward_mask = split().dropped_down(x, eye, p, seed) != 0
    assert torch.equal(forward_mask, keep)
    ones = torch.ones(tokens, n_in)
    dx = torch.zeros(tokens, n_in)
    # g = 1 everywhere, A = I: dx = keep * 1, and dA[r, k] = sum over tokens of keep * x at column k.
    da = split().dropout_backward(x, ones, eye, dx, p, seed, need_a=True)
    assert torch.equal(dx != 0, keep)
    assert torch.allclose(da, (keep * x).sum(0).expand(n_in, n_in), atol=1e-5)


def test_da_splits_fill_the_gpu(monkeypatch):
    monkeypatch.setattr(split(), "multiprocessors", lambda device: 132)
    # 4096 columns = 32 blocks of 128: 264 programs want 9 token ranges, when there are tokens enough.
    assert split().da_splits(8192, 4096, None, interpret=False) == 9
    assert split().da_splits(300, 4096, None, interpret=False) == 2
    assert split().da_splits(1, 4096, None, interpret=False) == 1
    assert split().da_splits(129, 40, None, interpret=True) == 4


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@DTYPES
def test_update_orders_agree(monkeypatch, dtype, dropout_p):
    from tests.ops.test_lora_linear import make_inputs

    use_backend(monkeypatch, "triton")
    x, weight, b, lora_a, lora_b, grad_y = make_inputs((37,), 45, 29, 5, dtype, weight_grad=True)
    tensors = (x, weight, b, lora_a, lora_b)
    results = []
    for order in ("lora_first", "base_first"):
        monkeypatch.setenv("MRGFAST_LORA_ORDER", order)
        y = lora_linear(x, weight, b, lora_a, lora_b, 1.5, dropout_p, training=True, seed=3)
        results.append([y, *torch.autograd.grad(y, tensors, grad_y)])
    for name, got, want in zip(("y", "dx", "dW", "db", "dA", "dB"), *results):
        assert_close(got, want.float(), dtype, name)


@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@DTYPES
def test_split_and_fused_designs_agree(monkeypatch, dtype, dropout_p):
    from tests.ops.test_lora_linear import make_inputs

    x, weight, b, lora_a, lora_b, grad_y = make_inputs((129,), 40, 23, 16, dtype, weight_grad=True)
    tensors = (x, weight, b, lora_a, lora_b)
    results = []
    for backend in ("triton", "triton-fused"):
        use_backend(monkeypatch, backend)
        y = lora_linear(x, weight, b, lora_a, lora_b, 0.5, dropout_p, training=True, seed=8)
        results.append([y, *torch.autograd.grad(y, tensors, grad_y)])
    for name, got, want in zip(("y", "dx", "dW", "db", "dA", "dB"), *results):
        assert_close(got, want.float(), dtype, name)


@pytest.mark.parametrize("env,value,match", [
    ("MRGFAST_LORA_KERNEL", "tiled", r"MRGFAST_LORA_KERNEL='tiled': expected one of split, fused"),
    ("MRGFAST_LORA_ORDER", "after", r"MRGFAST_LORA_ORDER='after': expected one of lora_first, base_first"),
])
def test_bad_design_settings_name_the_choices(monkeypatch, env, value, match):
    from tests.ops.test_lora_linear import make_inputs

    use_backend(monkeypatch, "triton")
    monkeypatch.setenv(env, value)
    x, weight, b, lora_a, lora_b, _ = make_inputs((4,), 8, 6, 2, torch.float32)
    with pytest.raises(ValueError, match=match):
        lora_linear(x, weight, b, lora_a, lora_b, 1.0)


def test_rank_beyond_the_on_chip_limit_is_refused():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="r=257 exceeds the on-chip limit r <= 256"):
        split().dropped_down(x, torch.randn(257, 8), 0.1, 1)
