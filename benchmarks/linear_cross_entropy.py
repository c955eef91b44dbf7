"""Benchmark: per-token log-probs from hidden states, mrgfast's fused LM head vs logits + log_softmax + gather.

On a GPU with Liger-Kernel installed (`pip install -e '.[peers]'`) it also compares, at the same shapes and dtype,
mrgfast's fused cross-entropy and fused DPO loss with Liger's (benchmarks/peers.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the repo root, not benchmarks/ (whose file names would shadow packages).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch

from benchmarks import harness
from benchmarks.peers import PEER, liger_cases
from mrgfast.ops import linear_logprobs, reference_logprobs
from mrgfast.ops.backend import select_backend
from mrgfast.ops.linear_cross_entropy import IMPLEMENTED, kernels as head_kernels

NAME = "linear_cross_entropy"
# Qwen2's vocabulary and a 1.5B model's hidden size over 4096 tokens (the issue's shapes).
FULL = dict(tokens=4096, hidden=1536, vocab=151936, warmup=1, repeats=3)
QUICK = dict(tokens=512, hidden=256, vocab=32001, warmup=2, repeats=5)
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}  # max |diff| relative to max |expected|


def make_inputs(tokens, hidden, vocab, dtype, device):
    """Hidden states (requiring grad, as under a LoRA-trained model), a frozen head, labels with a masked prompt."""
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    labels[: tokens // 8] = -100  # prompt tokens carry no loss
    upstream = torch.randn(tokens, generator=g).to(device)
    return h, weight, labels, upstream


def check_agreement(h, weight, labels, upstream, dtype) -> dict:
    """mrgfast's log-probs and dL/dh against the naive path on the same inputs; exit on a mismatch."""
    got = linear_logprobs(h, weight, labels)
    (got_grad,) = torch.autograd.grad(got, h, upstream)
    want = reference_logprobs(h, weight, labels)
    (want_grad,) = torch.autograd.grad(want, h, upstream)
    errors = {name: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
              for name, a, b in (("logp", got, want), ("grad_hidden", got_grad, want_grad))}
    if any(error > TOLERANCE[dtype] for error in errors.values()):
        sys.exit(f"{NAME}: mrgfast disagrees with the naive path: {errors}")
    return errors


def main() -> None:
    """Run the benchmark and write its report."""
    run = harness.open_run(NAME, __doc__, QUICK, FULL)
    shapes, device, dtype = run.shape, run.device, run.dtype
    h, weight, labels, upstream = make_inputs(shapes["tokens"], shapes["hidden"], shapes["vocab"], dtype, device)
    backend = select_backend("linear_cross_entropy", h, IMPLEMENTED)
    errors = check_agreement(h, weight, labels, upstream, dtype)

    def naive():
        """Full logits, log_softmax, gather: what a user writes today (TRL's per-token log-probs)."""
        reference_logprobs(h, weight, labels).backward(upstream)

    def fused():
        """mrgfast.ops.linear_logprobs, forward and backward."""
        linear_logprobs(h, weight, labels).backward(upstream)

    def drop_grad():
        """Every step allocates its own gradient."""
        h.grad = None

    kernels = head_kernels(backend)
    results = {"frozen_head": harness.measure_case({"naive": naive, "mrgfast": fused}, device, shapes["warmup"],
                                                   shapes["repeats"], "naive", "mrgfast", drop_grad)}
    if backend in ("cpu", "triton"):
        # The design decision, measured: dL/dh formed in the forward pass vs logits recomputed in backward.
        default = kernels.GRAD_IN_FORWARD
        kernels.GRAD_IN_FORWARD = not default
        try:
            other = harness.measure_case({"naive": naive, "mrgfast": fused}, device, shapes["warmup"],
                                         shapes["repeats"], "naive", "mrgfast", drop_grad)
        finally:
            kernels.GRAD_IN_FORWARD = default
        mode = "grad_in_forward" if not default else "recompute_in_backward"
        results[f"frozen_head_{mode}"] = {**other, "ablation": True}
    peers, peer_missing = liger_cases(h, weight, labels, shapes, device, TOLERANCE[dtype])
    results.update(peers)
    run.report({**{k: shapes[k] for k in ("tokens", "hidden", "vocab", "warmup", "repeats")},
                "mrgfast_backend": backend, "grad_in_forward_default": kernels.GRAD_IN_FORWARD,
                "peers": {PEER: peer_missing or "measured"},
                "step": "logp = f(hidden, W, labels); logp.backward(g); hidden requires grad, head frozen",
                "agreement": errors}, results)


if __name__ == "__main__":
    main()
