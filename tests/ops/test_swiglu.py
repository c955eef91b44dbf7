"""swiglu on every backend against the fp32 reference: output and both gradients."""

import pytest
import torch

from mrgfast.ops.swiglu import reference_swiglu, swiglu
from tests.ops.elementwise_cases import BACKENDS, DTYPES, TOKENS, check_against_oracle, random
from tests.ops.op_cases import use_backend


@pytest.mark.parametrize("backend", BACKENDS)
@DTYPES
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("inner", [1, 37, 1100])  # 1100: past one 1024-element program
@pytest.mark.parametrize("frozen_up", [False, True], ids=["both", "gate_only"])
def test_matches_reference(monkeypatch, backend, dtype, tokens, inner, frozen_up):
    use_backend(monkeypatch, backend)
    g = torch.Generator().manual_seed(tokens + inner)
    inputs = dict(gate=random(g, tokens, inner, dtype=dtype, scale=3.0), up=random(g, tokens, inner, dtype=dtype,
                                                                                   grad=not frozen_up))
    check_against_oracle(swiglu, reference_swiglu, inputs, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_elements(monkeypatch, backend):
    use_backend(monkeypatch, backend)
    gate, up = torch.zeros(0, 8, requires_grad=True), torch.zeros(0, 8, requires_grad=True)
    swiglu(gate, up).sum().backward()
    assert gate.grad.shape == up.grad.shape == (0, 8)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="must have one shape"):
        swiglu(torch.zeros(2, 3), torch.zeros(3, 2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens,inner", [(1, 1), (7, 37), (4099, 8192), (300, 18944)])
def test_matches_reference_on_gpu(monkeypatch, dtype, tokens, inner):
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    g = torch.Generator().manual_seed(tokens)
    cuda = lambda t: t.detach().cuda().requires_grad_()  # noqa: E731
    inputs = dict(gate=cuda(random(g, tokens, inner, dtype=dtype, scale=3.0)), up=cuda(random(g, tokens, inner,
                                                                                               dtype=dtype)))
    check_against_oracle(swiglu, reference_swiglu, inputs, dtype)
