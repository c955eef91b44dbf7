"""rms_norm (with and without the residual add) on every backend against the fp32 reference: outputs, gradients."""

import pytest
import torch

from mrgfast.ops.rms_norm import reference_rms_norm, rms_norm
from tests.ops.elementwise_cases import BACKENDS, DTYPES, TOKENS, check_against_oracle, random
from tests.ops.op_cases import use_backend

HIDDEN = [1, 37, 300]  # one feature, and rows that are not a power of two wide


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_matches_reference(monkeypatch, backend, dtype, tokens, hidden, with_residual):
    use_backend(monkeypatch, backend)
    g = torch.Generator().manual_seed(tokens * 1000 + hidden)
    inputs = dict(x=random(g, 2, tokens, hidden, dtype=dtype), weight=random(g, hidden, dtype=dtype, scale=0.5),
                  eps=1e-6, residual=random(g, 2, tokens, hidden, dtype=dtype) if with_residual else None)
    check_against_oracle(rms_norm, reference_rms_norm, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_and_fp32_weight_on_a_bf16_stream(monkeypatch, backend):
    """The LoRA case (a frozen norm weight gets no gradient) and autocast's (an fp32 weight on a bf16 stream gives an
    fp32 output, as torch promotes weight * row)."""
    use_backend(monkeypatch, backend)
    g = torch.Generator().manual_seed(3)
    x, residual = random(g, 9, 40, dtype=torch.bfloat16), random(g, 9, 40, dtype=torch.bfloat16)
    weight = random(g, 40, grad=False)
    normed, new_residual = rms_norm(x, weight, 1e-5, residual)
    assert normed.dtype == torch.float32 and new_residual.dtype == torch.bfloat16
    (normed.sum() + new_residual.float().sum()).backward()
    assert weight.grad is None and x.grad is not None and torch.equal(x.grad, residual.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_the_sum_is_used(monkeypatch, backend):
    """A gradient that reaches only the new residual passes straight through to x and residual."""
    use_backend(monkeypatch, backend)
    g = torch.Generator().manual_seed(4)
    x, residual, weight = random(g, 5, 24), random(g, 5, 24), random(g, 24)
    _, new_residual = rms_norm(x, weight, 1e-6, residual)
    upstream = torch.randn(5, 24, generator=g)
    new_residual.backward(upstream)
    assert torch.allclose(x.grad, upstream) and torch.allclose(residual.grad, upstream)
    assert weight.grad is None or not weight.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    x, weight = torch.zeros(0, 16, requires_grad=True), torch.ones(16, requires_grad=True)
    normed, new_residual = rms_norm(x, weight, 1e-6, torch.zeros(0, 16))
    assert normed.shape == new_residual.shape == (0, 16)
    normed.sum().backward()
    assert not weight.grad.any()


def test_a_weight_that_does_not_fit_is_an_error():
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.zeros(3, 8), torch.ones(7), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,hidden", [(1, 1), (7, 37), (4099, 2048), (300, 3584), (33, 8192)])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_matches_reference_on_gpu(monkeypatch, dtype, tokens, hidden, with_residual):
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(tokens + hidden)
    cuda = lambda t: t.detach().cuda().requires_grad_(t.requires_grad)  # noqa: E731
    inputs = dict(x=cuda(random(g, tokens, hidden, dtype=dtype)), weight=cuda(random(g, hidden, dtype=dtype)),
                  eps=1e-6, residual=cuda(random(g, tokens, hidden, dtype=dtype)) if with_residual else None)
    check_against_oracle(rms_norm, reference_rms_norm, inputs, dtype)
