"""Shared pieces of the elementwise op tests (rms_norm, rope, swiglu): backends, shapes, the fp32-oracle check."""

import pytest
import torch

from tests.ops.op_cases import assert_close

# Every backend these ops have that the CPU can run: the reference (the "auto" path on CPU) and Triton's kernels in
# the interpreter.
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# Token counts: one token, an odd few, more than one program's rows many times over.
TOKENS = [1, 7, 133]


def random(generator, *shape, dtype=torch.float32, grad=True, scale=1.0):
    """A standard-normal tensor in `dtype` (rounded there), requiring grad when asked."""
    return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_(grad)


def check_against_oracle(op, oracle, inputs: dict, dtype, seed=1):
    """op(**inputs) vs oracle on fp32 copies of the same rounded inputs: every output and every input's gradient,
    each output given its own random upstream gradient."""
    outputs = op(**inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    as32 = {k: v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
            for k, v in inputs.items()}
    expected = oracle(**as32)
    expected = expected if isinstance(expected, tuple) else (expected,)
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(out.shape, generator=g).to(out.device) for out in expected]
    with torch.no_grad():  # the dtypes the eager code gives these very inputs
        native = oracle(**inputs)
    for i, (got, want, eager) in enumerate(zip(outputs, expected, native if isinstance(native, tuple) else (native,))):
        assert got.dtype == eager.dtype, f"output {i}: dtype {got.dtype} != {eager.dtype}"
        assert_close(got, want, dtype, f"output {i}")
    leaves = [k for k, v in inputs.items() if torch.is_tensor(v) and v.requires_grad]
    got = torch.autograd.grad(outputs, [inputs[k] for k in leaves], [u.to(o.dtype) for u, o in zip(upstream, outputs)])
    want = torch.autograd.grad(expected, [as32[k] for k in leaves], upstream)
    for name, a, b in zip(leaves, got, want):
        assert a.dtype == inputs[name].dtype, f"d{name}: dtype {a.dtype} != {inputs[name].dtype}"
        assert_close(a, b, dtype, f"d{name}")
