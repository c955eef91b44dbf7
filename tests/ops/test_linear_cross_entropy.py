"""linear_cross_entropy / linear_logprobs on every backend against the full-logits path."""

import pytest
import torch
import torch.nn.functional as F

from mrgfast.ops.backends.torch import linear_cross_entropy as cpu_kernels
from mrgfast.ops.linear_cross_entropy import (
    check_labels, kernels, linear_cross_entropy, linear_logprobs, reference_logprobs,
)
from tests.ops.op_cases import BACKENDS, TOLERANCE, use_backend
from tests.ops.op_cases import assert_close as assert_close_to

# fp32 gradients sum ~150k vocabulary terms (with label smoothing, terms that nearly cancel): summation
# order alone moves them by ~1e-4 of their largest entry, so fp32 gets a wider bound than the matmul ops.
HEAD_TOLERANCE = {**TOLERANCE, torch.float32: 2e-4}


def assert_close(actual, expected, dtype, what):
    """assert_close with the LM-head tolerance table."""
    assert_close_to(actual, expected, dtype, what, HEAD_TOLERANCE)

# (tokens, hidden, vocab): vocabularies that are not multiples of any tile, and Qwen2's with few tokens.
SHAPES = [(37, 24, 1001), (6, 16, 32001), (3, 16, 151936), (1, 8, 5)]


def make_head(tokens, dim, vocab, dtype, bias=True, head_grad=False, ignore_every=4, seed=0):
    """Random hidden [tokens, dim] (requires grad), head [vocab, dim], bias, and labels with ignored slots."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, dim, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(dtype).requires_grad_(head_grad)
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_(head_grad) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    if ignore_every:
        labels[::ignore_every] = -100
    return hidden, weight, b, labels


def naive(hidden, weight, b, labels, **kwargs):
    """F.cross_entropy over materialised float64 logits: the oracle (fp64 so its own rounding is negligible)."""
    logits = F.linear(hidden.double(), weight.double(), None if b is None else b.double())
    return F.cross_entropy(logits, labels, **kwargs).float()


def grads_of(out, upstream, tensors):
    """Gradients of out (with upstream gradient) for the tensors that require them."""
    return torch.autograd.grad(out, [t for t in tensors if t is not None and t.requires_grad], upstream)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,dim,vocab", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_full_logits(monkeypatch, backend, dtype, tokens, dim, vocab, reduction, label_smoothing):
    use_backend(monkeypatch, backend)
    # A lone token stays counted: torch's mean over zero tokens is NaN (mrgfast's is 0, tested below).
    hidden, weight, b, labels = make_head(tokens, dim, vocab, dtype, ignore_every=4 if tokens > 1 else 0)
    out = linear_cross_entropy(hidden, weight, labels, b, reduction=reduction, label_smoothing=label_smoothing)
    upstream = torch.randn(out.shape)
    want_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in (hidden, weight, b)]
    want = naive(*want_inputs, labels, reduction=reduction, label_smoothing=label_smoothing)
    assert out.dtype == torch.float32
    assert_close(out, want, dtype, "loss")
    assert_close(grads_of(out, upstream, (hidden,))[0], grads_of(want, upstream, want_inputs[:1])[0], dtype, "dh")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradients_to_a_trainable_head(monkeypatch, backend, dtype, bias):
    use_backend(monkeypatch, backend)
    hidden, weight, b, labels = make_head(29, 20, 777, dtype, bias=bias, head_grad=True)
    tensors = (hidden, weight, b)
    out = linear_cross_entropy(hidden, weight, labels, b, label_smoothing=0.05)
    want_inputs = [t.detach().float().requires_grad_() if t is not None else None for t in tensors]
    want = naive(*want_inputs, labels, label_smoothing=0.05)
    one = torch.tensor(1.0)
    for name, got, expected in zip(("dh", "dW", "db"), grads_of(out, one, tensors), grads_of(want, one, want_inputs)):
        assert got.dtype == dtype
        assert_close(got, expected, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_match_log_softmax_gather(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    hidden, weight, b, labels = make_head(2 * 13, 16, 1001, torch.float32)
    hidden3d, labels2d = hidden.detach().reshape(2, 13, 16).requires_grad_(), labels.reshape(2, 13)
    got = linear_logprobs(hidden3d, weight, labels2d, b)
    want_hidden = hidden3d.detach().requires_grad_()
    want = reference_logprobs(want_hidden, weight, labels2d, b)
    assert got.shape == (2, 13)
    assert torch.all(got[labels2d == -100] == 0)
    assert_close(got, want, torch.float32, "logp")
    upstream = torch.randn(2, 13)
    assert_close(grads_of(got, upstream, (hidden3d,))[0], grads_of(want, upstream, (want_hidden,))[0],
                 torch.float32, "dh")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_gradient(monkeypatch, backend, reduction):
    use_backend(monkeypatch, backend)
    hidden, weight, b, labels = make_head(9, 12, 300, torch.float32, head_grad=True)
    labels[:] = -100
    out = linear_cross_entropy(hidden, weight, labels, b, reduction=reduction)
    assert torch.all(out == 0) and not torch.isnan(out).any()
    grads = grads_of(out, torch.ones(out.shape), (hidden, weight, b))
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    hidden, weight, b, labels = make_head(17, 12, 50, torch.float32, ignore_every=0)
    labels[::3] = 7  # ignore a real token id
    got = linear_cross_entropy(hidden, weight, labels, b, ignore_index=7, reduction="none")
    assert_close(got, naive(hidden, weight, b, labels, ignore_index=7, reduction="none"), torch.float32, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_accumulation_normalised_by_token_count(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    hidden, weight, b, labels = make_head(40, 16, 333, torch.float32, ignore_every=3)
    whole = linear_cross_entropy(hidden, weight, labels, b)
    (whole_grad,) = torch.autograd.grad(whole, hidden)
    total_tokens = (labels != -100).sum()
    # Unequal micro-batches with unequal counted tokens: each divides by the whole batch's count.
    accumulated, grad = 0.0, torch.zeros_like(hidden)
    for part in (slice(0, 11), slice(11, 40)):
        h = hidden.detach()[part].requires_grad_()
        loss = linear_cross_entropy(h, weight, labels[part], b, num_items_in_batch=total_tokens)
        loss.backward()
        accumulated += loss.detach()
        grad[part] = h.grad
    assert_close(accumulated, whole.detach(), torch.float32, "loss")
    assert_close(grad, whole_grad, torch.float32, "dh")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
def test_many_chunks_match_one(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    hidden, weight, b, labels = make_head(45, 16, 2003, torch.float32, head_grad=True)
    tensors = (hidden, weight, b)
    one_chunk = linear_cross_entropy(hidden, weight, labels, b)
    grads_one = grads_of(one_chunk, torch.tensor(1.0), tensors)
    if backend == "cpu":
        monkeypatch.setattr(cpu_kernels, "CHUNK_BUDGET_BYTES", 4 * 2003 * 7)  # 7 tokens a chunk
    else:
        from mrgfast.ops.backends.triton import linear_cross_entropy as triton_kernels
        monkeypatch.setattr(triton_kernels, "CHUNK_BUDGET_BYTES", 4 * 2003 * 16)
    chunked = linear_cross_entropy(hidden, weight, labels, b)
    assert_close(chunked, one_chunk, torch.float32, "loss")
    for got, want in zip(grads_of(chunked, torch.tensor(1.0), tensors), grads_one):
        assert_close(got, want, torch.float32, "grad")


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_recompute_in_backward_equals_grad_in_forward(monkeypatch, backend, dtype):
    use_backend(monkeypatch, backend)
    chosen = kernels(backend)
    hidden, weight, b, labels = make_head(33, 16, 999, dtype)
    upstream = torch.randn(33)
    results = []
    for grad_in_forward in (True, False):
        monkeypatch.setattr(chosen, "GRAD_IN_FORWARD", grad_in_forward)
        out = linear_cross_entropy(hidden, weight, labels, b, reduction="none", label_smoothing=0.1)
        results.append((out, grads_of(out, upstream, (hidden,))[0]))
    assert_close(results[0][0], results[1][0], dtype, "loss")
    assert_close(results[0][1], results[1][1], dtype, "dh")


def test_out_of_range_labels_name_the_largest_id():
    hidden, weight, b, labels = make_head(8, 4, 10, torch.float32)
    labels[3] = 12
    with pytest.raises(ValueError, match="token id 12 is outside the vocabulary of size 10"):
        linear_cross_entropy(hidden, weight, labels, b, validate=True)
    with pytest.raises(ValueError, match="largest id 12"):
        check_labels(labels, 10)
    labels[3] = -5
    with pytest.raises(ValueError, match="token id -5"):
        check_labels(labels, 10)


@pytest.mark.parametrize("bad,match", [
    (dict(hidden=torch.randn(4, 5)), "hidden must end in hidden_size=6"),
    (dict(labels=torch.zeros(3, dtype=torch.long)), "labels must have hidden's leading shape"),
    (dict(labels=torch.zeros(4)), "labels must be int64 or int32"),
    (dict(bias=torch.randn(9)), r"bias must be \[vocab\]"),
    (dict(reduction="avg"), "reduction must be one of mean, sum, none"),
    (dict(label_smoothing=1.5), r"label_smoothing must be in \[0, 1\]"),
])
def test_bad_input_names_the_problem(bad, match):
    args = dict(hidden=torch.randn(4, 6), weight=torch.randn(10, 6), labels=torch.zeros(4, dtype=torch.long),
                bias=None)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(**args)


# GPU: the compiled Triton kernels on a real GPU against float64 full logits.
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,dim,vocab", [(4096, 1536, 151936), (7, 896, 151936), (1000, 512, 32001)])
@pytest.mark.parametrize("head_grad", [False, True])
def test_triton_head_loss_matches_float64(dtype, tokens, dim, vocab, head_grad):
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(tokens, dim, generator=g, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=g, device="cuda") / dim**0.5).to(dtype).requires_grad_(head_grad)
    labels = torch.randint(0, vocab, (tokens,), generator=g, device="cuda")
    labels[::5] = -100
    loss = linear_cross_entropy(hidden, weight, labels, label_smoothing=0.1)
    grads = torch.autograd.grad(loss, [t for t in (hidden, weight) if t.requires_grad])
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_(head_grad)
    want = F.cross_entropy(h64 @ w64.t(), labels, label_smoothing=0.1)
    wants = torch.autograd.grad(want, [t for t in (h64, w64) if t.requires_grad])
    assert_close(loss, want.float(), dtype, "loss")
    for name, got, expected in zip(("dh", "dW"), grads, wants):
        assert_close(got, expected.float(), dtype, name)


@pytest.mark.gpu
def test_step_is_capturable_in_a_cuda_graph():
    hidden = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32001, 256, device="cuda", dtype=torch.bfloat16) / 16
    labels = torch.randint(0, 32001, (512,), device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (autotuning) outside the capture
        for _ in range(2):
            linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    hidden.grad = None
    with torch.cuda.graph(graph):
        loss = linear_cross_entropy(hidden, weight, labels)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    want = F.cross_entropy(hidden.detach().float() @ weight.float().t(), labels)
    assert abs(loss.item() - want.item()) < 2e-2
