"""The LM-head loss's compiled Triton kernels on a real GPU against float64 full logits."""

import pytest
import torch
import torch.nn.functional as F

from mrgfast.losses import fused_dpo_loss
from mrgfast.ops import linear_cross_entropy
from tests.ops.lora_cases import TOLERANCE, assert_close

HEAD_TOLERANCE = {**TOLERANCE, torch.float32: 2e-4}


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
    assert_close(loss, want.float(), dtype, "loss", HEAD_TOLERANCE)
    for name, got, expected in zip(("dh", "dW"), grads, wants):
        assert_close(got, expected.float(), dtype, name, HEAD_TOLERANCE)


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


def test_fused_dpo_on_gpu_runs_and_is_finite():
    hidden = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(1001, 128, device="cuda", dtype=torch.bfloat16) / 11
    labels = torch.randint(0, 1001, (64,), device="cuda")
    cu_seqlens = torch.tensor([0, 16, 32, 48, 64], device="cuda", dtype=torch.int32)
    loss, metrics = fused_dpo_loss(hidden, weight, labels, cu_seqlens, ref_logps=torch.zeros(4, device="cuda"))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()
    assert set(metrics) >= {"rewards/chosen", "rewards/margins", "logps/rejected"}
