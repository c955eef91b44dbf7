"""Liger-Kernel as a peer of mrgfast's fused LM-head losses: the same shapes and dtype, when it is installed on a GPU.

Cases built here carry `"peer": "liger-kernel"` (the harness leaves them out of a report's headline, which compares
mrgfast with the eager baseline). The peers' losses are checked against mrgfast's and the error is recorded in the
case; a disagreement is flagged (`"agrees": false`) rather than fatal, since the peer's definitions may change
between its releases.
"""

import importlib.util
import inspect
from typing import Optional

import torch

from benchmarks import harness
from mrgfast.losses import fused_dpo_loss
from mrgfast.ops import linear_cross_entropy

PEER = "liger-kernel"
BETA = 0.1
PAIRS = 4  # chosen/rejected pairs of the DPO case: 2 * PAIRS sequences share the benchmark's tokens


def liger_missing(device: torch.device) -> Optional[str]:
    """Why the Liger peer cannot run here (its kernels need CUDA and the package), or None when it can."""
    if device.type != "cuda":
        return f"{PEER} runs on CUDA only"
    if importlib.util.find_spec("liger_kernel") is None:
        return f"{PEER} is not installed (pip install -e '.[peers]')"
    return None


def first(output):
    """The loss of a Liger module's output (some versions return (loss, extras))."""
    return output[0] if isinstance(output, (tuple, list)) else output


def agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to max |want|, in fp32."""
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def compare(liger, mrgfast, hidden) -> dict:
    """Relative errors of mrgfast's loss and dL/dhidden against Liger's on the same inputs."""
    values = []
    for fn in (liger, mrgfast):
        hidden.grad = None
        loss = fn()
        loss.backward()
        values.append((loss.detach().clone(), hidden.grad.clone()))
    (liger_loss, liger_grad), (loss, grad) = values
    hidden.grad = None
    return {"loss": agreement(loss, liger_loss), "grad_hidden": agreement(grad, liger_grad)}


def flag(case: dict, errors: dict, tolerance: float, label: str) -> dict:
    """The case with its agreement errors and whether they are within `tolerance` (a warning when not)."""
    agrees = all(error <= tolerance for error in errors.values())
    if not agrees:
        print(f"{label}: warning: {PEER} and mrgfast disagree beyond {tolerance:g}: {errors}")
    return {**case, "peer": PEER, "agreement": errors, "agrees": agrees}


def cross_entropy_case(h, weight, labels, shapes: dict, device, tolerance: float) -> dict:
    """Mean cross-entropy from hidden states, forward + backward: LigerFusedLinearCrossEntropyLoss vs
    mrgfast.ops.linear_cross_entropy (hidden requires grad, head frozen)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    liger = lambda: first(liger_loss(weight, h, labels))  # noqa: E731 - Liger takes the head first
    mrgfast = lambda: linear_cross_entropy(h, weight, labels)  # noqa: E731
    errors = compare(liger, mrgfast, h)

    def drop_grad():
        """Every step allocates its own gradient."""
        h.grad = None

    case = harness.measure_case({"liger": lambda: liger().backward(), "mrgfast": lambda: mrgfast().backward()},
                                device, shapes["warmup"], shapes["repeats"], "liger", "mrgfast", drop_grad)
    return flag(case, errors, tolerance, "liger_cross_entropy")


def dpo_inputs(h, labels):
    """The benchmark's tokens as PAIRS chosen/rejected pairs of equal length (so padded = packed): [2P, T, D]
    hidden and [2P, T] labels for Liger, cu_seqlens for mrgfast, and frozen reference hidden states."""
    length = h.shape[0] // (2 * PAIRS)
    tokens = 2 * PAIRS * length
    hidden = h.detach()[:tokens].clone().requires_grad_()
    target = labels[:tokens].clone().view(2 * PAIRS, length)
    target[:, : length // 4] = -100  # each sequence opens with its (unscored) prompt
    ref = (hidden.detach() + 0.01 * torch.randn_like(hidden)).view(2 * PAIRS, length, -1)
    cu_seqlens = torch.arange(0, tokens + 1, length, device=h.device, dtype=torch.int32)
    return hidden, target, ref, cu_seqlens


def dpo_case(h, weight, labels, shapes: dict, device, tolerance: float) -> dict:
    """Sigmoid DPO loss from hidden states with a reference model's hidden states, forward + backward:
    LigerFusedLinearDPOLoss vs mrgfast.losses.fused_dpo_loss (sequence log-probs summed over their tokens, TRL's)."""
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    hidden, target, ref, cu_seqlens = dpo_inputs(h, labels)
    options = dict(ignore_index=-100, beta=BETA, use_ref_model=True)
    if "average_log_prob" in inspect.signature(LigerFusedLinearDPOLoss).parameters:
        options["average_log_prob"] = False  # summed, as TRL and mrgfast
    liger_loss = LigerFusedLinearDPOLoss(**options)
    batch, length = target.shape
    liger = lambda: first(liger_loss(weight, hidden.view(batch, length, -1), target,  # noqa: E731
                                     ref_input=ref, ref_weight=weight))
    mrgfast = lambda: fused_dpo_loss(hidden, weight, target.reshape(-1), cu_seqlens,  # noqa: E731
                                     ref_hidden=ref.reshape(hidden.shape), beta=BETA)[0]
    errors = compare(liger, mrgfast, hidden)

    def drop_grad():
        """Every step allocates its own gradient."""
        hidden.grad = None

    case = harness.measure_case({"liger": lambda: liger().backward(), "mrgfast": lambda: mrgfast().backward()},
                                device, shapes["warmup"], shapes["repeats"], "liger", "mrgfast", drop_grad)
    return flag({**case, "pairs": PAIRS, "sequence_length": length}, errors, tolerance, "liger_dpo")


def liger_cases(h, weight, labels, shapes: dict, device, tolerance: float) -> tuple[dict, Optional[str]]:
    """The Liger peer cases ({} with the reason when they cannot run here)."""
    missing = liger_missing(device)
    if missing:
        print(f"peers: skipped: {missing}")
        return {}, missing
    return {"liger_cross_entropy": cross_entropy_case(h, weight, labels, shapes, device, tolerance),
            "liger_dpo": dpo_case(h, weight, labels, shapes, device, tolerance)}, None
