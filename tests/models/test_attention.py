"""varlen_attention against dense masked attention written out by hand: outputs and gradients."""

import math

import pytest
import torch

from mrgfast.layout import Segments
from mrgfast.models.attention import attention_backend, varlen_attention

TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def reference_attention(q, k, v, q_lengths, k_lengths):
    """Dense softmax attention in fp32 over the whole stream, with a mask allowing query i of a document to see
    that document's keys up to its own position, counted from the end (bottom-right causal)."""
    tq, tk = q.shape[0], k.shape[0]
    allowed = torch.zeros(tq, tk, dtype=torch.bool)
    qs = ks = 0
    for lq, lk in zip(q_lengths, k_lengths):
        for i in range(lq):
            allowed[qs + i, ks:ks + lk - lq + i + 1] = True
        qs, ks = qs + lq, ks + lk
    group = q.shape[1] // k.shape[1]
    kf, vf = (t.float().repeat_interleave(group, dim=1) for t in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), kf) / math.sqrt(q.shape[-1])
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", weights, vf)


CASES = [  # (query lengths, key lengths): training (equal), decoding (1 query), chunked prefill, empty docs
    ([5, 1, 7, 3], [5, 1, 7, 3]),
    ([1, 1, 1], [4, 9, 1]),
    ([3, 2], [6, 2]),
    ([0, 4, 0], [2, 4, 3]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("q_lengths, k_lengths", CASES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
def test_matches_dense_reference(dtype, q_lengths, k_lengths, heads, kv_heads):
    g = torch.Generator().manual_seed(0)
    head_dim = 12
    q = torch.randn(sum(q_lengths), heads, head_dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(k_lengths), kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(k_lengths), kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(q.shape, generator=g).to(dtype)
    out = varlen_attention(q, k, v, Segments.from_lengths(q_lengths, "cpu"), Segments.from_lengths(k_lengths, "cpu"))
    ref = reference_attention(q, k, v, q_lengths, k_lengths)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    if q.shape[0] == 0:
        return
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **TOLERANCE[dtype], msg=name)


def test_cpu_and_forced_reference_use_per_document_sdpa(monkeypatch):
    q = torch.zeros(2, 1, 4)
    assert attention_backend(q) == "sdpa"
    monkeypatch.setenv("MRGFAST_BACKEND", "reference")
    assert attention_backend(q) == "sdpa"


def test_bad_shapes_raise():
    q, kv = torch.zeros(4, 3, 8), torch.zeros(4, 2, 8)
    seg = Segments.from_lengths([4], "cpu")
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        varlen_attention(q, kv, kv, seg)
    with pytest.raises(ValueError, match="more queries than keys"):
        varlen_attention(torch.zeros(4, 2, 8), kv[:2], kv[:2], seg, Segments.from_lengths([2], "cpu"))
    with pytest.raises(ValueError, match="seg_q has 1 documents but seg_k has 2"):
        varlen_attention(torch.zeros(4, 2, 8), kv, kv, seg, Segments.from_lengths([2, 2], "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("q_lengths, k_lengths", CASES[:3])
def test_cuda_backend_matches_dense_reference(q_lengths, k_lengths):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(q_lengths), 4, 64, generator=g).bfloat16()
    k = torch.randn(sum(k_lengths), 2, 64, generator=g).bfloat16()
    v = torch.randn(sum(k_lengths), 2, 64, generator=g).bfloat16()
    seg_q, seg_k = Segments.from_lengths(q_lengths, "cuda"), Segments.from_lengths(k_lengths, "cuda")
    out = varlen_attention(q.cuda(), k.cuda(), v.cuda(), seg_q, seg_k)
    assert attention_backend(q.cuda()) in ("flash_attn", "torch_varlen")
    torch.testing.assert_close(out.float().cpu(), reference_attention(q, k, v, q_lengths, k_lengths),
                               **TOLERANCE[torch.bfloat16])


STATIC_ROWS = [[5, 1, 6], [4, 0, 8], [12]]  # rows of width 12: several documents, an empty one, a whole row


def static_segments(rows, width: int, documents: int, device="cpu") -> Segments:
    """Segments.static for rows of these document lengths, cu_seqlens padded with empty documents."""
    bounds = [0]
    for row, lengths in enumerate(rows):
        for n in lengths:
            bounds.append(bounds[-1] + n)
        assert bounds[-1] == (row + 1) * width
    bounds += [bounds[-1]] * (documents + 1 - len(bounds))
    return Segments.static(torch.tensor(bounds, dtype=torch.int32, device=device), width)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
def test_static_segments_match_dense_reference(dtype, heads, kv_heads):
    g = torch.Generator().manual_seed(2)
    lengths = [n for row in STATIC_ROWS for n in row]
    q = torch.randn(36, heads, 8, generator=g).to(dtype).requires_grad_()
    k = torch.randn(36, kv_heads, 8, generator=g).to(dtype).requires_grad_()
    v = torch.randn(36, kv_heads, 8, generator=g).to(dtype).requires_grad_()
    seg = static_segments(STATIC_ROWS, 12, documents=9)
    out = varlen_attention(q, k, v, seg, seg)
    ref = reference_attention(q, k, v, lengths, lengths)
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    grad_out = torch.randn(q.shape, generator=g).to(dtype)
    for name, grad, ref_grad in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out),
                                    torch.autograd.grad(ref, (q, k, v), grad_out.float())):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **TOLERANCE[dtype], msg=name)


def test_static_segments_refuse_other_layouts():
    seg = static_segments(STATIC_ROWS, 12, documents=9)
    x = torch.zeros(36, 2, 8)
    with pytest.raises(ValueError, match="causal self-attention only"):
        varlen_attention(x, x, x, seg, Segments.from_lengths([12, 12, 12], "cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_segments_on_cuda_match_dense_reference():
    g = torch.Generator().manual_seed(3)
    lengths = [n for row in STATIC_ROWS for n in row]
    q, k, v = (torch.randn(36, h, 64, generator=g).bfloat16() for h in (4, 2, 2))
    out = varlen_attention(q.cuda(), k.cuda(), v.cuda(), *[static_segments(STATIC_ROWS, 12, 9, "cuda")] * 2)
    torch.testing.assert_close(out.float().cpu(), reference_attention(q, k, v, lengths, lengths),
                               **TOLERANCE[torch.bfloat16])
