"""DPO loss from per-sequence log-probs, with TRL's loss types, formulas and metric names."""

from numbers import Real
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")
# Loss types that read label_smoothing; the others would silently ignore it, so a non-zero value is an error.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")


def check_dpo_args(loss_type: str, beta, label_smoothing: float) -> None:
    """Raise ValueError for an unknown loss_type or a beta / label_smoothing it cannot use."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    # A tensor beta (a schedule) is taken as is: checking its value would synchronise with the device.
    if isinstance(beta, Real) and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing != 0.0 and loss_type not in SMOOTHED_LOSS_TYPES:
        raise ValueError(f"label_smoothing={label_smoothing} is only used by loss_type "
                         f"{' or '.join(SMOOTHED_LOSS_TYPES)}, not {loss_type!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing for loss_type 'robust' is a label-flip rate in [0, 0.5), "
                         f"got {label_smoothing}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")


def check_pair_logps(name: str, logps: Tensor, num_pairs: Optional[int] = None) -> Tensor:
    """logps as a 1-D floating tensor of at least fp32, ValueError naming `name` if it is not [num_pairs]."""
    if not isinstance(logps, Tensor) or logps.dim() != 1:
        shape = tuple(logps.shape) if isinstance(logps, Tensor) else type(logps).__name__
        raise ValueError(f"{name} must be a 1-D tensor [num_pairs], got {shape}")
    if num_pairs is not None and logps.shape[0] != num_pairs:
        raise ValueError(f"chosen/rejected count mismatch: {name} has {logps.shape[0]} entries, expected {num_pairs}")
    if not logps.is_floating_point():
        raise ValueError(f"{name} must be floating log-probs, got {logps.dtype}")
    return logps.to(torch.promote_types(logps.dtype, torch.float32))


def check_lengths(name: str, lengths: Tensor, num_pairs: int) -> Tensor:
    """Token counts [num_pairs] as fp32 clamped to >= 1 (TRL's clamp: an empty completion divides by 1)."""
    if not isinstance(lengths, Tensor):
        raise ValueError(f"{name} must be a tensor of token counts [num_pairs], got {type(lengths).__name__}")
    return check_pair_logps(name, lengths.float(), num_pairs).clamp_min(1.0)


def per_pair_losses(delta: Tensor, beta, loss_type: str, label_smoothing: float) -> Tensor:
    """The DPO loss of each pair [P] from delta = policy log-ratio margin minus the reference's."""
    logits = beta * delta
    if loss_type == "sigmoid":
        # Conservative DPO (label smoothing e): the preference label is trusted with probability 1 - e.
        return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    if loss_type == "hinge":
        return torch.relu(1 - logits)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    # robust: TRL's unbiased estimator under label-flip rate e (Chowdhury et al. 2024).
    return (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing)


def dpo_metrics(beta, chosen_logratios: Tensor, rejected_logratios: Tensor, policy_chosen_logps: Tensor,
                policy_rejected_logps: Tensor) -> Dict[str, Tensor]:
    """TRL's logged DPO metrics as detached 0-dim tensors (no .item(), so no device sync)."""
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
        return {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen_logps.detach().mean(),
            "logps/rejected": policy_rejected_logps.detach().mean(),
        }


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta=0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths: Optional[Tensor] = None,
             rejected_lengths: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Mean DPO loss over P pairs and TRL's metrics, from per-sequence summed log-probs [P] each.

    loss_type: "sigmoid" (with label smoothing e: conservative DPO), "hinge", "ipo" or "robust", with
    TRL's formulas on delta = (pi_c - ref_c) - (pi_r - ref_r). "ipo" divides each log-ratio by its
    sequence's counted-token length (clamped to >= 1) as TRL does, so it needs chosen_lengths and
    rejected_lengths [P]; the other types ignore them. Metrics use the summed log-probs, as TRL logs them.
    """
    check_dpo_args(loss_type, beta, label_smoothing)
    policy_chosen = check_pair_logps("policy_chosen_logps", policy_chosen_logps)
    num_pairs = policy_chosen.shape[0]
    if num_pairs == 0:
        raise ValueError("policy_chosen_logps is empty: the DPO loss needs at least one chosen/rejected pair")
    policy_rejected = check_pair_logps("policy_rejected_logps", policy_rejected_logps, num_pairs)
    ref_chosen = check_pair_logps("ref_chosen_logps", ref_chosen_logps, num_pairs)
    ref_rejected = check_pair_logps("ref_rejected_logps", ref_rejected_logps, num_pairs)

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type 'ipo' averages log-probs over tokens (as TRL does): pass chosen_lengths "
                             "and rejected_lengths, the counted tokens of each sequence [num_pairs]")
        chosen_len = check_lengths("chosen_lengths", chosen_lengths, num_pairs)
        rejected_len = check_lengths("rejected_lengths", rejected_lengths, num_pairs)
        delta = chosen_logratios / chosen_len - rejected_logratios / rejected_len
    else:
        delta = chosen_logratios - rejected_logratios
    loss = per_pair_losses(delta, beta, loss_type, label_smoothing).mean()
    return loss, dpo_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen, policy_rejected)
