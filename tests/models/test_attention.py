"""varlen_attention against dense masked attention written out by hand: outputs and gradients."""

import math

import pytest
import torch

from mrgfast.layout import Segments
from mrgfast.models import attention
from mrgfast.models.attention import (VarlenCall, attention_backend, choose_backend, expand_kv_heads, flex_varlen,
                                      fused_varlen, masked_sdpa, varlen_attention, varlen_call)

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


def random_qkv(q_lengths, k_lengths, heads, kv_heads, dtype=torch.float32, seed=0, head_dim=12):
    """q [Tq, heads, D], k and v [Tk, kv_heads, D] needing gradients, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lengths), heads, head_dim, generator=g).to(dtype).requires_grad_()
    k = torch.randn(sum(k_lengths), kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    v = torch.randn(sum(k_lengths), kv_heads, head_dim, generator=g).to(dtype).requires_grad_()
    return q, k, v, torch.randn(q.shape, generator=g).to(dtype)


def assert_matches_reference(out, q, k, v, grad_out, q_lengths, k_lengths, dtype=torch.float32):
    """`out` (and its gradients) equal the dense hand-written reference's."""
    ref = reference_attention(q, k, v, q_lengths, k_lengths)
    torch.testing.assert_close(out.float(), ref, **TOLERANCE[dtype])
    if q.shape[0] == 0:
        return
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out.float())
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad.float(), ref_grad.float(), **TOLERANCE[dtype], msg=name)


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
    q, k, v, grad_out = random_qkv(q_lengths, k_lengths, heads, kv_heads, dtype)
    out = varlen_attention(q, k, v, Segments.from_lengths(q_lengths, "cpu"), Segments.from_lengths(k_lengths, "cpu"))
    assert out.dtype == dtype and out.shape == q.shape
    assert_matches_reference(out, q, k, v, grad_out, q_lengths, k_lengths, dtype)


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


@pytest.mark.parametrize("on_cuda, dtype, forced, flash, varlen, flex, expected", [
    (False, torch.bfloat16, False, True, True, True, "sdpa"),            # CPU: per-document SDPA
    (True, torch.bfloat16, True, True, True, True, "sdpa"),              # MRGFAST_BACKEND=reference
    (True, torch.bfloat16, False, True, True, True, "flash_attn"),
    (True, torch.float16, False, False, True, True, "torch_varlen"),
    (True, torch.bfloat16, False, False, False, True, "flex"),           # torch without varlen_attn
    (True, torch.float32, False, True, True, True, "flex"),              # the varlen kernels take half dtypes only
    (True, torch.bfloat16, False, False, False, False, "masked_sdpa"),   # torch < 2.5: still one call, no loop
])
def test_backend_order(on_cuda, dtype, forced, flash, varlen, flex, expected):
    assert choose_backend(on_cuda, dtype, forced, flash, varlen, flex) == expected


def test_every_torch_varlen_signature_is_called_causally():
    def fn():
        return None
    assert varlen_call(fn, {"window_size": 0, "enable_gqa": 0}) == VarlenCall(fn, {"window_size": (-1, 0)}, True)
    assert varlen_call(fn, {"window_size": 0}) == VarlenCall(fn, {"window_size": (-1, 0)}, False)  # torch 2.11
    assert varlen_call(fn, {"is_causal": 0}) == VarlenCall(fn, {"is_causal": True}, False)
    assert varlen_call(fn, {"scale": 0}) is None  # no causal option: not usable


def test_expanded_kv_heads_are_gqa():
    q, k, v, _ = random_qkv([6], [6], 6, 2)
    expanded = [expand_kv_heads(t, 6) for t in (k, v)]
    assert expanded[0].shape == (6, 6, 12) and expand_kv_heads(q, 6) is q
    heads_first = [t.transpose(0, 1) for t in (q, *expanded)]
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(*heads_first, is_causal=True),
                               torch.nn.functional.scaled_dot_product_attention(
                                   q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                   enable_gqa=True))


def test_torch_varlen_without_gqa_gets_expanded_kv_and_the_causal_keyword(monkeypatch):
    q_lengths, k_lengths = [3, 2], [6, 2]
    q, k, v, grad_out = random_qkv(q_lengths, k_lengths, 4, 2)
    calls = []

    def varlen_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        """torch 2.11's signature, computed by the reference (which needs the keys' heads to be the queries')."""
        calls.append((k.shape[1], window_size, max_q, max_k))
        return reference_attention(q, k, v, q_lengths, k_lengths)

    monkeypatch.setattr(attention, "torch_varlen_call",
                        lambda: varlen_call(varlen_without_gqa, {"window_size": 0, "scale": 0}))
    out = fused_varlen("torch_varlen", q, k, v, Segments.from_lengths(q_lengths, "cpu"),
                       Segments.from_lengths(k_lengths, "cpu"), None)
    assert calls == [(4, (-1, 0), 3, 6)]
    assert_matches_reference(out, q, k, v, grad_out, q_lengths, k_lengths)


@pytest.mark.filterwarnings("ignore::UserWarning")  # eager FlexAttention on CPU warns that it is unfused
@pytest.mark.parametrize("q_lengths, k_lengths", CASES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
def test_flex_document_mask_matches_dense_reference(q_lengths, k_lengths, heads, kv_heads):
    from torch.nn.attention.flex_attention import flex_attention
    # Forward only: FlexAttention has no CPU backward (the GPU test checks the gradients).
    q, k, v = (t.detach() for t in random_qkv(q_lengths, k_lengths, heads, kv_heads)[:3])
    seg_q, seg_k = Segments.from_lengths(q_lengths, "cpu"), Segments.from_lengths(k_lengths, "cpu")
    out = flex_varlen(q, k, v, seg_q, seg_k, None, flex=flex_attention)  # eager: the mask, not the compiler
    torch.testing.assert_close(out, reference_attention(q, k, v, q_lengths, k_lengths), **TOLERANCE[torch.float32])


@pytest.mark.parametrize("q_lengths, k_lengths", CASES)
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (3, 3)])
def test_one_masked_sdpa_matches_dense_reference(q_lengths, k_lengths, heads, kv_heads):
    q, k, v, grad_out = random_qkv(q_lengths, k_lengths, heads, kv_heads)
    out = masked_sdpa(q, k, v, Segments.from_lengths(q_lengths, "cpu"), Segments.from_lengths(k_lengths, "cpu"),
                      None)
    assert_matches_reference(out, q, k, v, grad_out, q_lengths, k_lengths)


CUDA_BACKENDS = ["flash_attn", "torch_varlen", "flex", "masked_sdpa"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("q_lengths, k_lengths", CASES)
def test_every_cuda_backend_matches_dense_reference(backend, q_lengths, k_lengths, monkeypatch):
    if backend == "flash_attn" and not attention.flash_attn_available():
        pytest.skip("flash-attn is not installed")
    if backend == "torch_varlen" and attention.torch_varlen_call() is None:
        pytest.skip("this torch has no causal varlen_attn")
    if backend == "flex" and attention.flex_attention_function() is None:
        pytest.skip("this torch has no FlexAttention")
    monkeypatch.setattr(attention, "attention_backend", lambda q: backend)
    dtype = torch.float32 if backend in ("flex", "masked_sdpa") else torch.bfloat16
    q, k, v, grad_out = random_qkv(q_lengths, k_lengths, 4, 2, dtype=torch.float32, seed=1, head_dim=64)
    cuda = [t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*cuda, Segments.from_lengths(q_lengths, "cuda"), Segments.from_lengths(k_lengths, "cuda"))
    ref = reference_attention(q, k, v, q_lengths, k_lengths)
    tolerance = TOLERANCE[torch.bfloat16] if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(out.float().cpu(), ref, **tolerance)
    if q.shape[0] == 0:
        return
    grads = torch.autograd.grad(out, cuda, grad_out.to("cuda", dtype))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    for name, grad, ref_grad in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(grad.float().cpu(), ref_grad, **tolerance, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_tensors_never_take_the_per_document_loop():
    q = torch.zeros(4, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert attention_backend(q) in ("flash_attn", "torch_varlen", "flex", "masked_sdpa")


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
    with pytest.raises(ValueError, match="need Segments.static for both queries and keys"):
        varlen_attention(x, x, x, seg, Segments.from_lengths([12, 12, 12], "cpu"))


# Two rows of width 12 in DPO's shared layout: [prompt 3, chosen 4, rejected 2, padding 3] and [prompt 2, chosen 3,
# rejected 3, padding 4]. Query documents: prompt + chosen, rejected, padding; the rejected answer's keys gather
# its prompt first. Key gathers are padded to 40 entries and both bounds to 9 documents, as make_static_dpo does.
GATHERED_Q = [7, 2, 3, 5, 3, 4]
GATHERED_K = [7, 5, 3, 5, 5, 4]
GATHERED_INDEX = [*range(7), 0, 1, 2, 7, 8, 9, 10, 11, *range(12, 17), 12, 13, 17, 18, 19, 20, 21, 22, 23]


def test_static_segments_with_gathered_keys_match_dense_reference():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(24, 4, 8, generator=g).requires_grad_()
    k, v = (torch.randn(24, 2, 8, generator=g).requires_grad_() for _ in range(2))
    index = torch.tensor(GATHERED_INDEX + [0] * (40 - len(GATHERED_INDEX)))
    seg_q = static_segments([GATHERED_Q[:3], GATHERED_Q[3:]], 12, documents=9)
    seg_k = Segments.static(torch.tensor([0, 7, 12, 15, 20, 25, 29, 29, 29, 29], dtype=torch.int32), 12)
    out = varlen_attention(q, k.index_select(0, index), v.index_select(0, index), seg_q, seg_k)
    real = index[:len(GATHERED_INDEX)]
    ref = reference_attention(q, k.index_select(0, real), v.index_select(0, real), GATHERED_Q, GATHERED_K)
    torch.testing.assert_close(out, ref, **TOLERANCE[torch.float32])
    grad_out = torch.randn(q.shape, generator=g)
    for name, grad, ref_grad in zip("qkv", torch.autograd.grad(out, (q, k, v), grad_out),
                                    torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(grad, ref_grad, **TOLERANCE[torch.float32], msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_static_segments_on_cuda_match_dense_reference():
    g = torch.Generator().manual_seed(3)
    lengths = [n for row in STATIC_ROWS for n in row]
    q, k, v = (torch.randn(36, h, 64, generator=g).bfloat16() for h in (4, 2, 2))
    out = varlen_attention(q.cuda(), k.cuda(), v.cuda(), *[static_segments(STATIC_ROWS, 12, 9, "cuda")] * 2)
    torch.testing.assert_close(out.float().cpu(), reference_attention(q, k, v, lengths, lengths),
                               **TOLERANCE[torch.bfloat16])
