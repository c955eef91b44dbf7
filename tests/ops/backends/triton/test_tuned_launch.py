"""The GPU launch path of the Triton ops (tuner, GPU tile configs, split reductions), run in the interpreter against
the references: forward and every gradient, odd shapes, fp32 and bf16.

On a GPU the ops launch through `Tuned` with the GPU configs; the interpreter tests of the op modules take the
interpreter's own fixed small blocks. Here the op modules are made to take their GPU branch on CPU tensors, with a
stand-in benchmark that picks each kernel's last config, so that branch is checked where no GPU is.
"""

import pytest
import torch

from mrgfast.ops.backend import triton_interpreting
from mrgfast.ops.backends.triton import tuning
from mrgfast.ops.backends.triton.common import LaunchSettings
from tests.ops.op_cases import assert_close, keep_mask_of

pytestmark = pytest.mark.triton

TRITON_MODULES = ("lora_linear", "lora_fused", "linear_cross_entropy", "grouped_projection", "rms_norm")


@pytest.fixture
def gpu_branch(monkeypatch, tuner_env):
    """Triton ops on CPU tensors take their GPU branch; yields the tunings it makes."""
    if not triton_interpreting():
        pytest.skip("runs the kernels in the Triton interpreter (TRITON_INTERPRET=1)")
    import importlib

    # The interpreter multiplies raw bf16 bit patterns in tl.dot: tiles go to fp32 there (DOT_FP32).
    settings = LaunchSettings(False, {"DOT_FP32": True, "PRECISION": "ieee"})
    for name in TRITON_MODULES:
        module = importlib.import_module(f"mrgfast.ops.backends.triton.{name}")
        monkeypatch.setattr(module, "launch_settings", lambda tensor: settings)
        if hasattr(module, "split_for_parallelism"):  # it reads the GPU's SM count; 2 exercises split reductions
            monkeypatch.setattr(module, "split_for_parallelism", lambda *args, **kwargs: 2)
        if hasattr(module, "multiprocessors"):  # the GPU's SM count, for the split LoRA's dA token ranges
            monkeypatch.setattr(module, "multiprocessors", lambda device: 64)
    timings = iter(range(10**6, 0, -1))  # each candidate measures faster than the one before: the last one wins
    monkeypatch.setattr(tuning, "do_bench", lambda fn: (fn(), float(next(timings)))[1])
    monkeypatch.setenv("MRGFAST_BACKEND", "triton")
    return tuner_env


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


# The kernels each LoRA design tunes (the split design runs cuBLAS, plus its two kernels when there is dropout).
LORA_TUNED = {
    ("split", 0.0): set(),
    ("split", 0.25): {"lora_down_kernel", "lora_dropout_backward_kernel"},
    ("fused", 0.0): {"lora_forward_kernel", "lora_grad_input_kernel", "matmul_tn_kernel"},
    ("fused", 0.25): {"lora_forward_kernel", "lora_grad_input_kernel", "matmul_tn_kernel"},
}


@DTYPES
@pytest.mark.parametrize("dropout_p", [0.0, 0.25], ids=["nodrop", "drop"])
@pytest.mark.parametrize("design", ["split", "fused"])
def test_lora_linear(gpu_branch, monkeypatch, dtype, dropout_p, design):
    from mrgfast.ops import lora_linear, reference_lora_linear
    from tests.ops.test_lora_linear import make_inputs

    monkeypatch.setenv("MRGFAST_LORA_KERNEL", design)
    # 300 tokens: two dA token ranges of the split design (64 SMs stand in, ranges are multiples of 128 tokens).
    tokens = 300 if design == "split" else 37
    x, weight, b, lora_a, lora_b, grad_y = make_inputs((tokens,), 45, 29, 5, dtype, weight_grad=True)
    tensors = (x, weight, b, lora_a, lora_b)
    y = lora_linear(x, weight, b, lora_a, lora_b, 1.5, dropout_p, training=True, seed=3)
    grads = torch.autograd.grad(y, tensors, grad_y)
    as32 = [t.detach().float().requires_grad_() for t in tensors]
    y_ref = reference_lora_linear(*as32, 1.5, keep_mask_of("triton", tokens, 45, dropout_p, 3), dropout_p)
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dW", "db", "dA", "dB"), grads, torch.autograd.grad(y_ref, as32, grad_y)):
        assert_close(got, want, dtype, name)
    assert {event.kernel for event in gpu_branch} == LORA_TUNED[design, dropout_p]
    assert all("BLOCK_M=" in event.config for event in gpu_branch)
    # The split design's keys: the token bucket, K and the padded rank, then the dtypes and flags.
    for event in gpu_branch:
        if design == "split":
            assert event.key[1:4] == (512, 45, 16), event.key


@DTYPES
@pytest.mark.parametrize("head_grad", [True, False], ids=["trained_head", "frozen_head"])
def test_linear_cross_entropy(gpu_branch, monkeypatch, dtype, head_grad):
    from mrgfast.ops.backends.triton import linear_cross_entropy as triton_head
    from mrgfast.ops.linear_cross_entropy import linear_cross_entropy
    from tests.ops.test_linear_cross_entropy import HEAD_TOLERANCE, grads_of, make_head, naive

    # The tuned kernels: online logsumexp forward, dL/dlogits recomputed in backward (a frozen head's default
    # forms dL/dh in the forward with cuBLAS and a row kernel instead, tested by the op's own tests).
    monkeypatch.setattr(triton_head, "GRAD_IN_FORWARD", False)
    hidden, weight, b, labels = make_head(37, 24, 1001, dtype, head_grad=head_grad)
    tensors = [t for t in (hidden, weight, b) if t.requires_grad]
    out = linear_cross_entropy(hidden, weight, labels, b, label_smoothing=0.1)
    want_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in (hidden, weight, b)]
    want = naive(*want_inputs, labels, label_smoothing=0.1)
    assert_close(out, want, dtype, "loss", HEAD_TOLERANCE)
    one = torch.tensor(1.0)
    for name, got, expected in zip(("dh", "dW", "db"), grads_of(out, one, tensors), grads_of(want, one, want_inputs)):
        assert_close(got, expected, dtype, name, HEAD_TOLERANCE)
    assert {"lse_forward_kernel", "logits_grad_kernel"} <= {event.kernel for event in gpu_branch}


@DTYPES
@pytest.mark.parametrize("mode,grid", [("1d", None), ("2d", (3, 5))])
def test_grouped_projection(gpu_branch, dtype, mode, grid):
    from mrgfast.ops.group_tokens import group_layout
    from mrgfast.ops.grouped_projection import grouped_projection, reference_grouped_projection
    from tests.ops.test_grouped_projection import grads_of, make_inputs

    tensors = make_inputs(2, 15, 40, 33, 4, dtype, True, "all")
    x, weight, b, gamma, beta = tensors
    y = grouped_projection(x, weight, b, 4, mode, grid, True, normalize=True, norm_weight=gamma, norm_bias=beta)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    as32 = [t.detach().float().requires_grad_() for t in tensors]
    y_ref = reference_grouped_projection(as32[0], as32[1], as32[2], group_layout(x.shape, 4, mode, grid, True), True,
                                         as32[3], as32[4])
    assert_close(y, y_ref, dtype, "y")
    for name, got, want in zip(("dx", "dW", "db", "dgamma", "dbeta"), grads_of(y, tensors, grad_y),
                               grads_of(y_ref, as32, grad_y)):
        assert_close(got, want, dtype, name)
    assert len({event.kernel for event in gpu_branch}) == 3  # forward, dW and dX GEMMs


@DTYPES
def test_rms_norm(gpu_branch, monkeypatch, dtype):
    from mrgfast.ops.backends.triton import rms_norm as triton_rms_norm
    from mrgfast.ops.rms_norm import reference_rms_norm, rms_norm
    from tests.ops.elementwise_cases import check_against_oracle, random

    monkeypatch.setattr(triton_rms_norm, "_programs", lambda *args: 3)  # stands in for the SM count: 3 row walkers
    g = torch.Generator().manual_seed(0)
    inputs = dict(x=random(g, 37, 300, dtype=dtype), weight=random(g, 300, dtype=dtype), eps=1e-6,
                  residual=random(g, 37, 300, dtype=dtype))
    check_against_oracle(rms_norm, reference_rms_norm, inputs, dtype)
    assert {event.kernel for event in gpu_branch} == {"rms_norm_forward_kernel", "rms_norm_backward_kernel"}
