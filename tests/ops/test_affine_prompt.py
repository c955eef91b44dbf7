"""affine_prompt on every backend against the eager reference: output, every gradient, the in-place out path."""

import pytest
import torch

from mrgfast.ops.affine_prompt import affine_prompt, reference_affine_prompt
from tests.ops.op_cases import BACKENDS, GPU_BACKENDS, assert_close, use_backend

# (B, L, K, D); K None is prompt-wise (P [L, D], no weights). D = 130 crosses the Triton test blocks (64) and
# the C++ feature chunks (64); K = 3 leaves masked lanes in the Triton bank tile (4); K = 1 is a one-entry book.
CASES = [(1, 1, None, 1), (4, 5, None, 37), (1, 5, 1, 3), (4, 1, 3, 130), (4, 5, 3, 37), (1, 5, 3, 130)]
NAMES = ("prompts", "gamma", "beta", "weights")


def make_inputs(batch, length, book, dim, per_token, dtype, seed=0, requires_grad=NAMES):
    """Random P, gamma, beta, w (None when prompt-wise) in `dtype`; those named in requires_grad need a gradient."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    modulation = (batch, length, dim) if per_token else (batch, dim)
    tensors = {
        "prompts": rand(length, dim) if book is None else rand(book, length, dim),
        "gamma": rand(*modulation) * 0.5,
        "beta": rand(*modulation),
        "weights": None if book is None else rand(batch, book).softmax(-1).to(dtype),
    }
    return {name: None if t is None else t.requires_grad_(name in requires_grad) for name, t in tensors.items()}


def fp32_copies(tensors: dict) -> dict:
    """Detached fp32 copies with the same requires_grad: the oracle runs on the same (rounded) values."""
    return {name: None if t is None else t.detach().float().requires_grad_(t.requires_grad)
            for name, t in tensors.items()}


def grads_of(result, tensors: dict, grad: torch.Tensor) -> dict:
    """Gradients of `result` (with upstream `grad`) for every tensor that requires one, by name."""
    wanted = {name: t for name, t in tensors.items() if t is not None and t.requires_grad}
    values = torch.autograd.grad(result, list(wanted.values()), grad.to(result.dtype))
    return dict(zip(wanted, values))


def check_against_reference(tensors, dtype, out=None, offsets=None, out_ref=None):
    """Run affine_prompt and the fp32 oracle with one upstream gradient; compare output and every gradient."""
    result = affine_prompt(**tensors, out=out, offsets=offsets)
    grad = torch.randn(result.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    as32 = fp32_copies(tensors)
    expected = reference_affine_prompt(**as32, out=out_ref, offsets=offsets)
    assert result.dtype == dtype
    assert_close(result, expected, dtype, "out")
    got, want = grads_of(result, tensors, grad), grads_of(expected, as32, grad.float())
    assert set(got) == set(want)
    for name in got:
        assert_close(got[name], want[name], dtype, f"d{name}")
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,length,book,dim", CASES)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_image", "per_token"])
def test_matches_reference(monkeypatch, backend, dtype, batch, length, book, dim, per_token):
    use_backend(monkeypatch, backend)
    tensors = make_inputs(batch, length, book, dim, per_token, dtype)
    result = check_against_reference(tensors, dtype)
    assert result.shape == (batch, length, dim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needed", NAMES)
def test_any_subset_of_gradients(monkeypatch, backend, needed):
    use_backend(monkeypatch, backend)
    for per_token in (False, True):
        check_against_reference(make_inputs(3, 4, 3, 70, per_token, torch.float32, requires_grad=(needed,)),
                                torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("book", [None, 3], ids=["prompt_wise", "book"])
def test_writes_into_a_buffer_that_requires_grad(monkeypatch, backend, dtype, book):
    use_backend(monkeypatch, backend)
    batch, length, dim, rows = 4, 5, 37, 11
    tensors = make_inputs(batch, length, book, dim, False, dtype)
    # The embedding sequence comes from upstream ops (here: a scaled leaf): its other rows must get gradients.
    source = torch.randn(batch, rows, dim, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_()
    source32 = source.detach().float().requires_grad_()
    offsets = torch.tensor([0, 6, 2, 3])
    buffer = source * 2
    grad = torch.randn(batch, rows, dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    result = affine_prompt(**tensors, out=buffer, offsets=offsets)
    assert result is buffer  # filled in place and handed back
    as32 = fp32_copies(tensors)
    expected = reference_affine_prompt(**as32, out=source32 * 2, offsets=offsets)
    assert_close(result, expected, dtype, "out")
    got = grads_of(result, {**tensors, "source": source}, grad)
    want = grads_of(expected, {**as32, "source": source32}, grad.float())
    for name in want:
        assert_close(got[name], want[name], dtype, f"d{name}")
    # Rows the prompts overwrote get no gradient; the others get 2 * grad.
    assert not got["source"][1, 6:11].any() and not got["source"][0, :5].any()
    assert torch.equal(got["source"][1, :6], (2 * grad[1, :6].float()).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_into_a_leaf_buffer_at_an_int_offset(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    batch, length, book, dim, rows = 2, 3, 2, 9, 8
    tensors = make_inputs(batch, length, book, dim, True, torch.float32)
    buffer = torch.full((batch, rows, dim), 5.0)  # a plain leaf that needs no gradient
    result = affine_prompt(**tensors, out=buffer, offsets=4)
    assert result is buffer and result.requires_grad
    untouched = torch.cat([buffer[:, :4], buffer[:, 7:]], dim=1)
    assert torch.equal(untouched, torch.full_like(untouched, 5.0))
    as32 = fp32_copies(tensors)
    expected = reference_affine_prompt(**as32)
    assert_close(buffer[:, 4:7], expected, torch.float32, "prompt rows")
    grad = torch.randn(batch, rows, dim)
    got = grads_of(result, tensors, grad)
    want = grads_of(expected, as32, grad[:, 4:7])
    for name in want:
        assert_close(got[name], want[name], torch.float32, f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    tensors = make_inputs(0, 3, 2, 5, False, torch.float32)
    result = affine_prompt(**tensors)
    assert result.shape == (0, 3, 5)
    grads = grads_of(result, tensors, torch.zeros(0, 3, 5))
    assert not grads["prompts"].any() and grads["gamma"].shape == (0, 5) and grads["weights"].shape == (0, 2)


def test_cpu_gradients_do_not_depend_on_the_thread_count(monkeypatch):
    use_backend(monkeypatch, "cpu")
    tensors = make_inputs(5, 7, 3, 300, False, torch.float32)
    grad = torch.randn(5, 7, 300)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            runs.append(grads_of(affine_prompt(**tensors), tensors, grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])


def bad(**changes):
    """Valid book-wise arguments (B=2, K=3, L=4, D=6, out [2, 10, 6]) with `changes` applied."""
    args = dict(prompts=torch.zeros(3, 4, 6), gamma=torch.zeros(2, 6), beta=torch.zeros(2, 6),
                weights=torch.zeros(2, 3), out=torch.zeros(2, 10, 6), offsets=1)
    args.update(changes)
    return args


@pytest.mark.parametrize("changes,match", [
    (dict(prompts=torch.zeros(6)), "prompts"),
    (dict(gamma=torch.zeros(2, 5)), "gamma"),
    (dict(gamma=torch.zeros(2, 3, 6), beta=torch.zeros(2, 3, 6)), "gamma"),
    (dict(beta=torch.zeros(2, 4, 6)), "beta"),
    (dict(weights=None), "weights"),
    (dict(weights=torch.zeros(2, 4)), "weights"),
    (dict(prompts=torch.zeros(4, 6)), "weights"),
    (dict(beta=torch.zeros(2, 6, dtype=torch.bfloat16)), "beta"),
    (dict(out=torch.zeros(2, 10, 5)), "out"),
    (dict(out=torch.zeros(2, 6, 10).transpose(1, 2)), "out"),
    (dict(offsets=7), "offsets"),
    (dict(offsets=-1), "offsets"),
    (dict(offsets=torch.tensor([0, 7])), "offsets"),
    (dict(offsets=torch.tensor([0, 1, 2])), "offsets"),
    (dict(offsets=torch.tensor([0.0, 1.0])), "offsets"),
    (dict(out=None), "offsets"),
])
def test_bad_input_names_the_argument(changes, match):
    with pytest.raises(ValueError, match=match):
        affine_prompt(**bad(**changes))


# GPU: the compiled Triton and CUDA kernels on a real GPU against the fp32 reference.
# (B, L, K, D): K None is prompt-wise. Odd D crosses the 256-feature blocks; K = 3, 8, 11 cross the CUDA bank tile
# (8) and the Triton bank tile widths; the large case is MRG-LLM-sized.
GPU_CASES = [(1, 1, None, 1), (4, 5, None, 130), (3, 5, 1, 37), (4, 7, 3, 1000), (16, 32, 8, 4096), (5, 3, 11, 513)]


def gpu_inputs(batch, length, book, dim, per_token, dtype, requires_grad=NAMES):
    """Random CUDA inputs in `dtype`; those named in requires_grad need a gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype)  # noqa: E731
    modulation = (batch, length, dim) if per_token else (batch, dim)
    tensors = {"prompts": rand(length, dim) if book is None else rand(book, length, dim),
               "gamma": rand(*modulation) * 0.5, "beta": rand(*modulation),
               "weights": None if book is None else rand(batch, book).softmax(-1).to(dtype)}
    return {k: None if t is None else t.requires_grad_(k in requires_grad) for k, t in tensors.items()}


def compare_on_gpu(tensors, dtype, out=None, offsets=None, out_ref=None):
    """affine_prompt vs the fp32 oracle: output and every gradient."""
    result = affine_prompt(**tensors, out=out, offsets=offsets)
    grad = torch.randn(result.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(dtype)
    as32 = {k: None if t is None else t.detach().float().requires_grad_(t.requires_grad) for k, t in tensors.items()}
    expected = reference_affine_prompt(**as32, out=out_ref, offsets=offsets)
    assert_close(result, expected, dtype, "out")
    leaves = {k: t for k, t in tensors.items() if t is not None and t.requires_grad}
    got = torch.autograd.grad(result, list(leaves.values()), grad)
    want = torch.autograd.grad(expected, [as32[k] for k in leaves], grad.float())
    for name, a, b in zip(leaves, got, want):
        assert_close(a, b, dtype, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,length,book,dim", GPU_CASES)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_image", "per_token"])
def test_matches_reference_on_gpu(monkeypatch, backend, dtype, batch, length, book, dim, per_token):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    compare_on_gpu(gpu_inputs(batch, length, book, dim, per_token, dtype), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("needed", NAMES)
def test_any_subset_of_gradients_on_gpu(monkeypatch, backend, needed):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    for per_token in (False, True):
        compare_on_gpu(gpu_inputs(3, 4, 3, 300, per_token, torch.float32, requires_grad=(needed,)), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_writes_into_the_embedding_buffer_on_gpu(monkeypatch, backend, dtype):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    batch, length, book, dim, rows = 4, 9, 3, 777, 40
    tensors = gpu_inputs(batch, length, book, dim, False, dtype)
    source = torch.randn(batch, rows, dim, device="cuda").to(dtype).requires_grad_()
    offsets = torch.tensor([0, 31, 5, 17], device="cuda")
    buffer = source * 2
    result = affine_prompt(**tensors, out=buffer, offsets=offsets)
    assert result is buffer
    source32 = source.detach().float().requires_grad_()
    as32 = {k: t.detach().float().requires_grad_() for k, t in tensors.items()}
    expected = reference_affine_prompt(**as32, out=source32 * 2, offsets=offsets)
    assert_close(result, expected, dtype, "out")
    grad = torch.randn(batch, rows, dim, device="cuda").to(dtype)
    got = torch.autograd.grad(result, [*tensors.values(), source], grad)
    want = torch.autograd.grad(expected, [*as32.values(), source32], grad.float())
    for name, a, b in zip([*NAMES, "source"], got, want):
        assert_close(a, b, dtype, f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradients_are_deterministic_on_gpu(monkeypatch, backend):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    tensors = gpu_inputs(16, 32, 8, 4096, False, torch.bfloat16)
    leaves = list(tensors.values())
    grad = torch.randn(16, 32, 4096, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(affine_prompt(**tensors), leaves, grad) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
