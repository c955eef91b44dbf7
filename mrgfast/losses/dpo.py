"""DPO loss from per-sequence log-probs, with TRL's loss types, formulas and metric names."""

from numbers import Real
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

# "sft" is TRL's negative log-likelihood of the chosen tokens (mean over the batch's chosen tokens): combined with a
# preference loss, as loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha], it is RPO (TRL's rpo_alpha before 1.0),
# which keeps DPO from lowering the chosen answers' likelihood along with the rejected ones'.
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "sft")
# Loss types that read label_smoothing; the others would silently ignore it, so a non-zero value is an error.
SMOOTHED_LOSS_TYPES = ("sigmoid", "robust")
# Loss types that need each sequence's counted-token length.
LENGTH_LOSS_TYPES = ("ipo", "sft")


def loss_types_of(loss_type: Union[str, Sequence[str]]) -> list:
    """loss_type as TRL 1.x takes it (one name or a list of names to sum), as a list of names."""
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def check_dpo_args(loss_type: Union[str, Sequence[str]], beta, label_smoothing: float,
                   loss_weights: Optional[Sequence[float]] = None) -> None:
    """Raise ValueError for an unknown loss_type, loss_weights that do not fit it, or a beta / label_smoothing
    it cannot use."""
    types = loss_types_of(loss_type)
    if not types or len(set(types)) != len(types) or any(t not in LOSS_TYPES for t in types):
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)} or a list of distinct ones, "
                         f"got {loss_type!r}")
    if loss_weights is not None and len(loss_weights) != len(types):
        raise ValueError(f"loss_weights must give one weight per loss_type ({len(types)}: {types}), "
                         f"got {list(loss_weights)}")
    if types == ["sft"]:
        raise ValueError("loss_type 'sft' alone is supervised fine-tuning: combine it with a preference loss, "
                         "e.g. loss_type=[sigmoid, sft] with loss_weights=[1.0, 1.0] (RPO)")
    # A tensor beta (a schedule) is taken as is: checking its value would synchronise with the device.
    if isinstance(beta, Real) and not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if label_smoothing != 0.0 and not set(types) & set(SMOOTHED_LOSS_TYPES):
        raise ValueError(f"label_smoothing={label_smoothing} is only used by loss_type "
                         f"{' or '.join(SMOOTHED_LOSS_TYPES)}, not {loss_type!r}")
    if "robust" in types and not 0.0 <= label_smoothing < 0.5:
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
    """The preference loss of each pair [P] from delta = policy log-ratio margin minus the reference's."""
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


def pair_sum(values: Tensor, pair_mask: Optional[Tensor]) -> Tensor:
    """The sum over pairs [P], or with `pair_mask` [P] (bool) over the real pairs only (a static batch's padded
    slots add nothing, whatever they hold); no device sync."""
    return values.sum() if pair_mask is None else torch.where(pair_mask, values, 0).sum()


def pair_mean(values: Tensor, pair_mask: Optional[Tensor]) -> Tensor:
    """The mean over pairs [P], or with `pair_mask` over the real pairs only (see pair_sum)."""
    if pair_mask is None:
        return values.mean()
    return pair_sum(values, pair_mask) / pair_mask.sum().clamp_min(1)


def dpo_metrics(beta, chosen_logratios: Tensor, rejected_logratios: Tensor, policy_chosen_logps: Tensor,
                policy_rejected_logps: Tensor, pair_mask: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """TRL's logged DPO metrics as detached 0-dim tensors (no .item(), so no device sync), over the real pairs."""
    with torch.no_grad():
        chosen_rewards = beta * chosen_logratios.detach()
        rejected_rewards = beta * rejected_logratios.detach()
        return {
            "rewards/chosen": pair_mean(chosen_rewards, pair_mask),
            "rewards/rejected": pair_mean(rejected_rewards, pair_mask),
            "rewards/accuracies": pair_mean((chosen_rewards > rejected_rewards).float(), pair_mask),
            "rewards/margins": pair_mean(chosen_rewards - rejected_rewards, pair_mask),
            "logps/chosen": pair_mean(policy_chosen_logps.detach(), pair_mask),
            "logps/rejected": pair_mean(policy_rejected_logps.detach(), pair_mask),
        }


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta=0.1, loss_type: Union[str, Sequence[str]] = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: Optional[Tensor] = None,
             rejected_lengths: Optional[Tensor] = None,
             loss_weights: Optional[Sequence[float]] = None,
             pair_mask: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Mean DPO loss over P pairs and TRL's metrics, from per-sequence summed log-probs [P] each.

    loss_type: "sigmoid" (with label smoothing e: conservative DPO), "hinge", "ipo" or "robust", with
    TRL's formulas on delta = (pi_c - ref_c) - (pi_r - ref_r); or, as TRL 1.x, a list of them summed with
    loss_weights (default 1 each), where "sft" adds the chosen tokens' mean negative log-likelihood (RPO).
    "ipo" divides each log-ratio by its sequence's counted-token length (clamped to >= 1) as TRL does, and "sft"
    averages over the chosen tokens, so both need chosen_lengths and rejected_lengths [P]; the other types ignore
    them. Metrics use the summed log-probs, as TRL logs them. `pair_mask` [P] (bool), for a static batch's padded
    pair slots: means and sums run over the True pairs only.
    """
    check_dpo_args(loss_type, beta, label_smoothing, loss_weights)
    types = loss_types_of(loss_type)
    policy_chosen = check_pair_logps("policy_chosen_logps", policy_chosen_logps)
    num_pairs = policy_chosen.shape[0]
    if num_pairs == 0:
        raise ValueError("policy_chosen_logps is empty: the DPO loss needs at least one chosen/rejected pair")
    policy_rejected = check_pair_logps("policy_rejected_logps", policy_rejected_logps, num_pairs)
    ref_chosen = check_pair_logps("ref_chosen_logps", ref_chosen_logps, num_pairs)
    ref_rejected = check_pair_logps("ref_rejected_logps", ref_rejected_logps, num_pairs)

    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    needs_lengths = [t for t in types if t in LENGTH_LOSS_TYPES]
    if needs_lengths:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"loss_type {needs_lengths[0]!r} averages log-probs over tokens (as TRL does): pass "
                             "chosen_lengths and rejected_lengths, the counted tokens of each sequence [num_pairs]")
        chosen_len = check_lengths("chosen_lengths", chosen_lengths, num_pairs)
        rejected_len = check_lengths("rejected_lengths", rejected_lengths, num_pairs)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    loss = policy_chosen.new_zeros(())
    for name, weight in zip(types, weights):
        if name == "sft":
            # TRL's: the mean over every chosen token of the batch (unclamped counts: an empty answer adds none).
            chosen_tokens = check_pair_logps("chosen_lengths", chosen_lengths.float())
            term = -pair_sum(policy_chosen, pair_mask) / pair_sum(chosen_tokens, pair_mask).clamp_min(1)
        elif name == "ipo":
            delta = chosen_logratios / chosen_len - rejected_logratios / rejected_len
            term = pair_mean(per_pair_losses(delta, beta, name, label_smoothing), pair_mask)
        else:
            term = pair_mean(per_pair_losses(chosen_logratios - rejected_logratios, beta, name, label_smoothing),
                             pair_mask)
        loss = loss + weight * term
    return loss, dpo_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen, policy_rejected, pair_mask)
