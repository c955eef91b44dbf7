"""Training losses built on mrgfast's fused ops: DPO from log-probs or straight from hidden states."""

from mrgfast.losses.dpo import LOSS_TYPES, dpo_loss
from mrgfast.losses.dpo_inputs import dpo_loss_inputs, dpo_sequence_logps
from mrgfast.losses.fused_dpo import fused_dpo_loss

__all__ = ["LOSS_TYPES", "dpo_loss", "dpo_loss_inputs", "dpo_sequence_logps", "fused_dpo_loss"]
