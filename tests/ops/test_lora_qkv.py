"""lora_qkv_linear (fused projections sharing x) against separate eager projections."""

import pytest
import torch

from mrgfast.ops import lora_qkv_linear, reference_lora_linear, reference_lora_qkv_linear
from tests.ops.op_cases import LORA_BACKENDS, assert_close, keep_mask_of, use_backend


def make_projections(n_in, outs, ranks, dtype, bias=True, seed=0):
    """Per-projection weights/biases/adapters (all requiring grad) and the input x."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    weights = [rand(out, n_in) for out in outs]
    biases = [rand(out) if bias else None for out in outs]
    lora_as = [(rand(r, n_in) * 0.3).requires_grad_() for r in ranks]
    lora_bs = [(rand(out, r) * 0.3).requires_grad_() for out, r in zip(outs, ranks)]
    x = rand(3, 11, n_in).requires_grad_()
    return x, weights, biases, lora_as, lora_bs


@pytest.mark.parametrize("backend", LORA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1], ids=["nodrop", "drop"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_separate_projections(monkeypatch, backend, dtype, dropout_p, bias):
    use_backend(monkeypatch, backend)
    # GQA-shaped: q wider than k and v, and a different rank per projection.
    outs, ranks, scalings = (40, 20, 20), (8, 4, 1), (2.0, 0.5, 1.0)
    x, weights, biases, lora_as, lora_bs = make_projections(36, outs, ranks, dtype, bias)
    fused_weight = torch.cat(weights)
    fused_bias = torch.cat(biases) if bias else None
    q, k, v = lora_qkv_linear(x, fused_weight, fused_bias, lora_as, lora_bs, scalings, dropout_p,
                              training=True, seed=5)
    upstream = [torch.randn_like(t) for t in (q, k, v)]
    params = [x, *lora_as, *lora_bs]
    grads = torch.autograd.grad((q, k, v), params, upstream)

    keep = keep_mask_of(backend, 33, 36, dropout_p, 5)
    as32 = [p.detach().float().requires_grad_() for p in params]
    x32, a32, b32 = as32[0], as32[1:4], as32[4:]
    refs = reference_lora_qkv_linear(x32.reshape(-1, 36), [w.float() for w in weights],
                                     [b.float() if b is not None else None for b in biases], a32, b32, scalings,
                                     keep, dropout_p)
    grads_ref = torch.autograd.grad(refs, as32, [u.float().reshape(-1, u.shape[-1]) for u in upstream])
    for name, got, want in zip("qkv", (q, k, v), refs):
        assert_close(got.reshape(-1, got.shape[-1]), want, dtype, name)
    for index, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_close(got.reshape(want.shape), want, dtype, f"grad {index}")


@pytest.mark.parametrize("backend", LORA_BACKENDS)
def test_fp32_adapters_beside_bf16_base(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    outs, ranks, scalings = (24, 8, 8), (4, 2, 1), (2.0, 0.5, 1.0)
    x, weights, biases, lora_as, lora_bs = make_projections(20, outs, ranks, torch.bfloat16)
    lora_as = [a.detach().float().requires_grad_() for a in lora_as]
    lora_bs = [b.detach().float().requires_grad_() for b in lora_bs]
    outputs = lora_qkv_linear(x, torch.cat(weights), torch.cat(biases), lora_as, lora_bs, scalings, 0.1,
                              training=True, seed=9)
    upstream = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)).bfloat16()
                for i, t in enumerate(outputs)]
    params = [x, *lora_as, *lora_bs]
    grads = torch.autograd.grad(outputs, params, upstream)
    assert [g.dtype for g in grads] == [torch.bfloat16] + [torch.float32] * 6
    as32 = [p.detach().float().requires_grad_() for p in params]
    keep = keep_mask_of(backend, 33, 20, 0.1, 9)
    refs = reference_lora_qkv_linear(as32[0].reshape(-1, 20), [w.float() for w in weights], [b.float() for b in biases],
                                     as32[1:4], as32[4:], scalings, keep, 0.1)
    grads_ref = torch.autograd.grad(refs, as32, [u.float().reshape(-1, u.shape[-1]) for u in upstream])
    for name, got, want in zip("qkv", outputs, refs):
        assert_close(got.reshape(want.shape), want, torch.bfloat16, name)
    for index, (got, want) in enumerate(zip(grads, grads_ref)):
        assert_close(got.reshape(want.shape), want, torch.bfloat16, f"grad {index}")


def test_outputs_are_views_of_one_buffer():
    x, weights, biases, lora_as, lora_bs = make_projections(16, (8, 4, 4), (2, 2, 2), torch.float32)
    q, k, v = lora_qkv_linear(x, torch.cat(weights), torch.cat(biases), lora_as, lora_bs, (1.0, 1.0, 1.0))
    assert q.shape == (3, 11, 8) and k.shape == (3, 11, 4) and v.shape == (3, 11, 4)
    assert q.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    q.view(3, 11, 2, 4)  # heads split from a column slice without a copy


@pytest.mark.parametrize("bad,match", [
    (dict(scalings=(1.0, 1.0)), "one entry per projection"),
    (dict(weight=torch.randn(15, 16)), r"weight must be \[sum of projection outs = 16, in\]"),
    (dict(lora_bs=[torch.randn(8, 2), torch.randn(4, 3), torch.randn(4, 2)]), "projection 1"),
])
def test_bad_input_names_the_problem(bad, match):
    args = dict(x=torch.randn(5, 16), weight=torch.randn(16, 16), bias=None,
                lora_as=[torch.randn(2, 16)] * 3, lora_bs=[torch.randn(8, 2), torch.randn(4, 2), torch.randn(4, 2)],
                scalings=(1.0, 1.0, 1.0))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        lora_qkv_linear(**args)


@pytest.mark.gpu
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
