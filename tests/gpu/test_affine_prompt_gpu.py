"""affine_prompt's compiled Triton and CUDA kernels on a real GPU against the fp32 reference."""

import pytest
import torch

from mrgfast.layers.affine_prompt import AffinePromptGenerator
from mrgfast.native import cuda_kernels_built
from mrgfast.ops.affine_prompt import affine_prompt, reference_affine_prompt
from tests.ops.lora_cases import assert_close

# (B, L, K, D): K None is prompt-wise. Odd D crosses the 256-feature blocks; K = 3, 8, 11 cross the CUDA bank tile
# (8) and the Triton bank tile widths; the large case is MRG-LLM-sized.
CASES = [(1, 1, None, 1), (4, 5, None, 130), (3, 5, 1, 37), (4, 7, 3, 1000), (16, 32, 8, 4096), (5, 3, 11, 513)]
NAMES = ("prompts", "gamma", "beta", "weights")
# Both GPU backends, never skipped: an mrgfast._C built without CUDA kernels fails the "cuda" cases loudly.
GPU_BACKENDS = ["triton", "cuda"]


def make_inputs(batch, length, book, dim, per_token, dtype, requires_grad=NAMES):
    """Random CUDA inputs in `dtype`; those named in requires_grad need a gradient."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device="cuda").to(dtype)  # noqa: E731
    modulation = (batch, length, dim) if per_token else (batch, dim)
    tensors = {"prompts": rand(length, dim) if book is None else rand(book, length, dim),
               "gamma": rand(*modulation) * 0.5, "beta": rand(*modulation),
               "weights": None if book is None else rand(batch, book).softmax(-1).to(dtype)}
    return {k: None if t is None else t.requires_grad_(k in requires_grad) for k, t in tensors.items()}


def compare(tensors, dtype, out=None, offsets=None, out_ref=None):
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


def test_cuda_kernels_are_built():
    assert cuda_kernels_built(), "mrgfast._C has no CUDA kernels: reinstall with nvcc and a CUDA torch present"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,length,book,dim", CASES)
@pytest.mark.parametrize("per_token", [False, True], ids=["per_image", "per_token"])
def test_matches_reference_on_gpu(monkeypatch, backend, dtype, batch, length, book, dim, per_token):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    compare(make_inputs(batch, length, book, dim, per_token, dtype), dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("needed", NAMES)
def test_any_subset_of_gradients_on_gpu(monkeypatch, backend, needed):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    for per_token in (False, True):
        compare(make_inputs(3, 4, 3, 300, per_token, torch.float32, requires_grad=(needed,)), torch.float32)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_writes_into_the_embedding_buffer_on_gpu(monkeypatch, backend, dtype):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    batch, length, book, dim, rows = 4, 9, 3, 777, 40
    tensors = make_inputs(batch, length, book, dim, False, dtype)
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


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gradients_are_deterministic_on_gpu(monkeypatch, backend):
    monkeypatch.setenv("MRGFAST_BACKEND", backend)
    tensors = make_inputs(16, 32, 8, 4096, False, torch.bfloat16)
    leaves = list(tensors.values())
    grad = torch.randn(16, 32, 4096, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(affine_prompt(**tensors), leaves, grad) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_generator_on_gpu_matches_reference_backend(monkeypatch, backend):
    torch.manual_seed(0)
    generator = AffinePromptGenerator(64, 256, 8, book_size=4, hidden_dim=32).cuda()
    with torch.no_grad():
        generator.film.weight.normal_(0.0, 0.1)
        generator.mixer.weight.normal_(0.0, 0.1)
    features = torch.randn(3, 10, 64, device="cuda", requires_grad=True)
    results = {}
    for name in ("reference", backend):
        monkeypatch.setenv("MRGFAST_BACKEND", name)
        out = generator(features)
        results[name] = [out, *torch.autograd.grad(out.square().sum(), [features, *generator.parameters()])]
    for got, want in zip(results[backend], results["reference"]):
        assert_close(got, want, torch.float32, "generator")
