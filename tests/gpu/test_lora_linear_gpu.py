"""LoRA linear's compiled Triton kernels on a real GPU against the fp32 reference (autotuned, split-M paths)."""

import pytest
import torch

from mrgfast.ops import lora_linear, lora_qkv_linear, reference_lora_linear
from mrgfast.ops.triton.common import triton_keep_mask
from tests.ops.lora_cases import assert_close

SHAPES = [(1, 64, 64, 16), (333, 1000, 777, 8), (2048, 1024, 4096, 16), (4099, 4096, 1536, 64), (257, 512, 300, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tokens,n_in,n_out,rank", SHAPES)
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
    keep = triton_keep_mask(tokens, n_in, dropout_p, 17, "cuda") if dropout_p else None
    as32 = [t.detach().float().requires_grad_() for t in tensors]
    y_ref = reference_lora_linear(*as32, 2.0, keep, dropout_p)
    grads_ref = torch.autograd.grad(y_ref, as32, grad_y.float())
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB"), grads, grads_ref):
        assert_close(got, want, dtype, name)


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


def test_fused_qkv_on_gpu_matches_separate_projections():
    outs = (2048, 256, 256)
    x = torch.randn(2, 300, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weights = [torch.randn(o, 2048, device="cuda", dtype=torch.bfloat16) / 45 for o in outs]
    biases = [torch.randn(o, device="cuda", dtype=torch.bfloat16) for o in outs]
    lora_as = [torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16) / 45 for _ in outs]
    lora_bs = [torch.randn(o, 8, device="cuda", dtype=torch.bfloat16) for o in outs]
    fused = lora_qkv_linear(x, torch.cat(weights), torch.cat(biases), lora_as, lora_bs, (2.0, 2.0, 2.0))
    for got, w, bias, a, b in zip(fused, weights, biases, lora_as, lora_bs):
        want = reference_lora_linear(x.float(), w.float(), bias.float(), a.float(), b.float(), 2.0)
        assert_close(got, want, torch.bfloat16, "qkv")
