"""lora_linear on every backend against the eager reference: output and every gradient."""

import pytest
import torch

from mrgfast.ops import lora_linear, reference_lora_linear
from tests.ops.op_cases import LORA_BACKENDS, assert_close, keep_mask_of, use_backend

# (leading dims, in, out, r): tokens 1, 18, 19, 37, 129; in/out not multiples of 16; r across {1, 5, 8, 16, 64}.
SHAPES = [((37,), 45, 29, 1), ((2, 9), 33, 50, 8), ((1,), 17, 3, 64), ((19,), 70, 66, 5), ((129,), 40, 23, 16)]


def make_inputs(lead, n_in, n_out, rank, dtype, bias=True, weight_grad=False, seed=0):
    """Random x, W, b, A, B (B non-zero so the LoRA path matters) and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    x = rand(*lead, n_in).requires_grad_()
    weight = rand(n_out, n_in).requires_grad_(weight_grad)
    b = rand(n_out).requires_grad_() if bias else None
    lora_a = (rand(rank, n_in) * 0.3).requires_grad_()
    lora_b = (rand(n_out, rank) * 0.3).requires_grad_()
    grad_y = rand(*lead, n_out)
    return x, weight, b, lora_a, lora_b, grad_y


def run_and_grads(fn, tensors, grad_y):
    """Output of fn() and the gradients of every tensor in `tensors` that requires one."""
    y = fn()
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, grad_y.to(y.dtype))
    return y, grads


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("lead,n_in,n_out,rank", SHAPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainedW", "frozenW"])
def test_matches_reference(monkeypatch, backend, dtype, lead, n_in, n_out, rank, bias, dropout_p, weight_grad):
    use_backend(monkeypatch, backend)
    x, weight, b, lora_a, lora_b, grad_y = make_inputs(lead, n_in, n_out, rank, dtype, bias, weight_grad)
    tensors = (x, weight, b, lora_a, lora_b)
    seed, scaling = 1234, 0.625
    y, grads = run_and_grads(
        lambda: lora_linear(x, weight, b, lora_a, lora_b, scaling, dropout_p, training=True, seed=seed),
        tensors, grad_y)
    tokens = x.numel() // n_in
    keep = keep_mask_of(backend, tokens, n_in, dropout_p, seed)
    # The oracle runs in fp32 on the same (rounded) inputs.
    as32 = [t.detach().float().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    y_ref, grads_ref = run_and_grads(
        lambda: reference_lora_linear(as32[0], as32[1], as32[2], as32[3], as32[4], scaling, keep, dropout_p),
        as32, grad_y.float())
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    names = [n for n, t in zip(("dx", "dW", "db", "dA", "dB"), tensors) if t is not None and t.requires_grad]
    for name, got, want in zip(names, grads, grads_ref):
        assert_close(got, want, dtype, name)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_empty_and_single_token(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    for tokens in (0, 1):
        x, weight, b, lora_a, lora_b, grad_y = make_inputs((tokens,), 20, 18, 4, torch.float32, weight_grad=True)
        y = lora_linear(x, weight, b, lora_a, lora_b, 2.0)
        assert y.shape == (tokens, 18)
        y.backward(grad_y)
        expected_db = grad_y.sum(0)
        assert torch.allclose(b.grad, expected_db, atol=1e-5)
        assert lora_a.grad.shape == lora_a.shape and lora_b.grad.shape == lora_b.shape
        if tokens == 0:
            assert not weight.grad.any() and not lora_a.grad.any() and not lora_b.grad.any()


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_dropout_reproducible_from_seed(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x, weight, b, lora_a, lora_b, grad_y = make_inputs((23,), 31, 19, 8, torch.float32)
    run = lambda seed: lora_linear(x, weight, b, lora_a, lora_b, 1.0, 0.4, training=True, seed=seed)  # noqa: E731
    first, again, other = run(7), run(7), run(8)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # Dropout is the identity outside training, whatever the seed.
    eval_out = lora_linear(x, weight, b, lora_a, lora_b, 1.0, 0.4, training=False, seed=7)
    assert torch.allclose(eval_out, reference_lora_linear(x, weight, b, lora_a, lora_b, 1.0), atol=1e-5)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_unseeded_dropout_follows_torch_manual_seed(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x, weight, b, lora_a, lora_b, _ = make_inputs((12,), 16, 16, 4, torch.float32)
    outs = []
    for _ in range(2):
        torch.manual_seed(99)
        outs.append(lora_linear(x, weight, b, lora_a, lora_b, 1.0, 0.5, training=True))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_frozen_weight_gets_no_gradient(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x, weight, b, lora_a, lora_b, grad_y = make_inputs((9,), 21, 13, 3, torch.float32, weight_grad=False)
    lora_linear(x, weight, b, lora_a, lora_b, 1.0).backward(grad_y)
    assert weight.grad is None
    assert x.grad is not None and lora_a.grad is not None and lora_b.grad is not None


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_adapter_gradients_without_input_gradient(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x, weight, b, lora_a, lora_b, grad_y = make_inputs((15,), 24, 20, 6, torch.float32)
    x = x.detach()
    lora_linear(x, weight, b, lora_a, lora_b, 0.5, 0.2, training=True, seed=3).backward(grad_y)
    keep = keep_mask_of(backend, 15, 24, 0.2, 3)
    a_ref, b_ref = lora_a.detach().requires_grad_(), lora_b.detach().requires_grad_()
    reference_lora_linear(x, weight, b, a_ref, b_ref, 0.5, keep, 0.2).backward(grad_y)
    assert_close(lora_a.grad, a_ref.grad, torch.float32, "dA")
    assert_close(lora_b.grad, b_ref.grad, torch.float32, "dB")


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
def test_fp32_adapters_beside_bf16_base(monkeypatch, backend, dropout_p):
    use_backend(monkeypatch, backend)
    x, weight, b, _, _, grad_y = make_inputs((37,), 18, 14, 5, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    lora_a = (torch.randn(5, 18, generator=g) * 0.3).requires_grad_()
    lora_b = (torch.randn(14, 5, generator=g) * 0.3).requires_grad_()
    tensors = (x, b, lora_a, lora_b)
    y, grads = run_and_grads(
        lambda: lora_linear(x, weight, b, lora_a, lora_b, 0.75, dropout_p, training=True, seed=11), tensors, grad_y)
    assert y.dtype == torch.bfloat16
    assert [t.dtype for t in grads] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    # The oracle: fp32 on the values the kernels see (x, W, b as given; the adapters rounded to bf16).
    keep = keep_mask_of(backend, 37, 18, dropout_p, 11)
    as32 = [t.detach().float().requires_grad_() for t in tensors]
    y_ref, grads_ref = run_and_grads(
        lambda: reference_lora_linear(as32[0], weight.float(), as32[1], as32[2].bfloat16().float(),
                                      as32[3].bfloat16().float(), 0.75, keep, dropout_p), as32, grad_y.float())
    assert_close(y, y_ref, torch.bfloat16, "y")
    for name, got, want in zip(("dx", "db", "dA", "dB"), grads, grads_ref):
        assert_close(got, want, torch.bfloat16, name)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(4, 7)), "x must end in in_features=8"),
    (dict(lora_a=torch.randn(2, 9)), r"lora_a must be \[r, in\]"),
    (dict(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0)), "r > 0"),
    (dict(lora_b=torch.randn(6, 3)), r"lora_b must be \[out, r\] = \[6, 2\]"),
    (dict(bias=torch.randn(5)), r"bias must be \[out\]"),
    (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    (dict(x=torch.randn(4, 8, dtype=torch.float64)), "must share a dtype"),
])
def test_bad_input_names_the_problem(bad, match):
    args = dict(x=torch.randn(4, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_a=torch.randn(2, 8),
                lora_b=torch.randn(6, 2), scaling=1.0, dropout_p=0.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        lora_linear(**args, training=True)


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_autocast_computes_in_the_autocast_dtype(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x, weight, b, lora_a, lora_b, grad_y = make_inputs((13,), 24, 20, 4, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, weight, b, lora_a, lora_b, 1.5)
    assert y.dtype == torch.bfloat16
    y.backward(grad_y.bfloat16())
    assert x.grad.dtype == torch.float32 and lora_a.grad.dtype == torch.float32
    rounded = [t.detach().bfloat16().float() for t in (x, weight, b, lora_a, lora_b)]
    assert_close(y, reference_lora_linear(*rounded, 1.5), torch.bfloat16, "y")


# GPU: the compiled Triton kernels on a real GPU against the fp32 reference (autotuned, split-M paths).
GPU_SHAPES = [(1, 64, 64, 16), (333, 1000, 777, 8), (2048, 1024, 4096, 16), (4099, 4096, 1536, 64),
              (257, 512, 300, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tokens,n_in,n_out,rank", GPU_SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.05])
def test_triton_matches_reference_on_gpu(monkeypatch, dtype, tokens, n_in, n_out, rank, dropout_p):
    monkeypatch.setenv("MRGFAST_BACKEND", "auto")
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    x = rand(tokens, n_in).requires_grad_()
    weight = (rand(n_out, n_in) / n_in**0.5).requires_grad_()
    bias = rand(n_out).requires_grad_()
    lora_a = (rand(rank, n_in) / n_in**0.5).requires_grad_()
    lora_b = (rand(n_out, rank) / rank**0.5).requires_grad_()
    grad_y = rand(tokens, n_out)
    tensors = (x, weight, bias, lora_a, lora_b)
    y = lora_linear(x, weight, bias, lora_a, lora_b, 2.0, dropout_p, training=True, seed=17)
    grads = torch.autograd.grad(y, tensors, grad_y)
    keep = keep_mask_of("triton", tokens, n_in, dropout_p, 17, "cuda")
    as32 = [t.detach().float().requires_grad_() for t in tensors]
    y_ref = reference_lora_linear(*as32, 2.0, keep, dropout_p)
    grads_ref = torch.autograd.grad(y_ref, as32, grad_y.float())
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB"), grads, grads_ref):
        assert_close(got, want, dtype, name)


@pytest.mark.gpu
def test_deterministic_mode_gives_identical_gradients():
    torch.use_deterministic_algorithms(True)
    try:
        x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(512, 512, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.randn(512, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        runs = [torch.autograd.grad(lora_linear(x, w, None, a, b, 1.0).sum(), (a, b)) for _ in range(2)]
        assert all(torch.equal(u, v) for u, v in zip(*runs))
    finally:
        torch.use_deterministic_algorithms(False)
