"""TRL's DPOTrainer with its chosen/rejected log-probs from mrgfast's fused log-prob op on the last hidden states.

DPOTrainer (TRL 1.x) gives its model a fused LM head (`trl.trainer.utils.add_fused_lm_head`): calls with
`fused_lm_head=True` return per-token log-probs (plus entropy, mean logit, top-1 for its metrics) instead of logits.
That head is the extension point: `patch_dpo_trainer(trainer)` puts mrgfast's in its place on the policy (and on
a separate reference model), or construct `FusedDPOTrainer` instead of `DPOTrainer`.
"""

import functools
import inspect

import torch
import trl
from torch import Tensor, nn
from trl.trainer.utils import FusedCausalLMOutput

from mrgfast.integrations import hf
from mrgfast.integrations.causal_lm import check_head, head_operands
from mrgfast.integrations.instance import (check_restorable, patched_by, previous_forward, replace_forward,
                                           restore_forward)
from mrgfast.integrations.models import check_known, unwrap_peft
from mrgfast.ops import linear_logprobs

OWNER = "mrgfast.integrations.trl"
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# fp32 logits one chunk of tokens may hold in the statistics pass (its softmax temporaries are about 3x that).
CHUNK_BYTES = 64 * 2**20
IGNORE_INDEX = -100  # TRL masks prompt and padding labels with -100
PATCHED_LORA = "_mrgfast_patched_lora"  # trainer attribute: whether patch_dpo_trainer patched the LoRA layers itself


def trl_head_outputs(hf_model: nn.Module) -> tuple:
    """The per-token fields TRL's fused head on this model computes; ValueError when it has none, or uses what
    mrgfast's op does not (temperature, logit scaling or soft-capping, an fp32 head)."""
    function = getattr(hf_model.__dict__.get("forward"), "__func__", None)
    if getattr(getattr(function, "__code__", None), "co_name", "") != "_fused_forward":
        raise ValueError(f"{OWNER}: {type(hf_model).__name__} has no TRL fused LM head (DPOTrainer in TRL "
                         f"{trl.__version__} adds one when it is constructed): patch the trainer, not the model")
    closed = inspect.getclosurevars(function).nonlocals
    settings = {name: closed.get(name) for name in ("temperature", "logit_scale", "final_logit_softcapping",
                                                    "cast_lm_head_to_fp32", "outputs")}
    if (settings["temperature"], settings["logit_scale"], settings["final_logit_softcapping"],
            settings["cast_lm_head_to_fp32"]) != (1.0, 1.0, None, False) or settings["outputs"] is None:
        raise ValueError(f"{OWNER}: TRL's fused LM head here uses {settings}; mrgfast's log-prob op computes plain "
                         "log-softmax of the head's logits (temperature 1, no scaling or soft-capping)")
    return tuple(settings["outputs"])


@torch.no_grad()
def token_statistics(hidden: Tensor, head: nn.Linear, labels: Tensor, wanted: tuple) -> dict:
    """TRL's metric fields per token [N] (no gradient), from [chunk, vocab] logits at a time, never [N, vocab]."""
    vocab = head.weight.shape[0]
    fields = {name: [] for name in STATISTICS if name in wanted}
    rows = max(1, CHUNK_BYTES // (4 * vocab))
    for start in range(0, hidden.shape[0], rows):
        # The head's own dtype for the GEMM, fp32 for the reductions: what TRL's tiles do.
        logits = nn.functional.linear(hidden[start:start + rows], head.weight, head.bias).float()
        lse = logits.logsumexp(-1)
        if "entropy" in fields:
            fields["entropy"].append(lse - (logits.softmax(-1) * logits).sum(-1))
        if "log_sum_sq_probs" in fields:
            fields["log_sum_sq_probs"].append((2 * logits).logsumexp(-1) - 2 * lse)
        if "mean_logits" in fields:
            fields["mean_logits"].append(logits.mean(-1))
        if "is_top1" in fields:
            fields["is_top1"].append(logits.argmax(-1) == labels[start:start + rows])  # argmax: the first maximum
    empty = {"is_top1": torch.bool}
    return {name: torch.cat(parts) if parts else hidden.new_zeros(0, dtype=empty.get(name, torch.float32))
            for name, parts in fields.items()}


def fused_logprob_forward(model_class: type, outputs: tuple):
    """The forward to bind in place of TRL's fused head: the same contract, log-probs from mrgfast's op."""

    @functools.wraps(model_class.forward)  # the class's signature, as TRL keeps it: generate() validates against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            return previous_forward(self, OWNER)(*args, labels=labels, shift_labels=shift_labels,
                                                 num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.model(*args, **kwargs).last_hidden_state  # the backbone, as TRL's head calls it
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = check_head(self, OWNER)
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        mask = labels != IGNORE_INDEX
        # Only the labelled positions go through the head (prompts and padding are most of a DPO batch).
        picked, targets = hidden[mask], labels[mask]
        operands = head_operands(picked, head)
        with torch.autocast(picked.device.type, enabled=False):
            per_token = {"log_probs": linear_logprobs(operands[0], operands[1], targets, operands[2])}
        per_token.update(token_statistics(picked.detach(), head, targets, outputs))
        full = {name: values.new_zeros(mask.shape).masked_scatter(mask, values) for name, values in per_token.items()}
        log_probs = full["log_probs"]
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, label_mask=mask, **full)

    return forward


def head_models(trainer) -> list:
    """(name, transformers model) for the policy and, when DPOTrainer keeps one, the separate reference model."""
    found = [("policy", unwrap_peft(trainer.accelerator.unwrap_model(trainer.model)))]
    if getattr(trainer, "ref_model", None) is not None:
        found.append(("reference", unwrap_peft(trainer.accelerator.unwrap_model(trainer.ref_model))))
    return found


def patch_dpo_trainer(trainer: trl.DPOTrainer, lora: bool = True) -> trl.DPOTrainer:
    """Make a constructed DPOTrainer compute its log-probs with mrgfast's fused op, and (lora=True) its PEFT LoRA
    layers with mrgfast's fused LoRA op unless mrgfast.patch already did; returns it. Every check runs first."""
    if not isinstance(trainer, trl.DPOTrainer):
        raise TypeError(f"{OWNER}: patch_dpo_trainer takes a trl.DPOTrainer, got {type(trainer).__name__}")
    plans = []
    for name, hf_model in head_models(trainer):
        check_known(hf_model, f"{OWNER} ({name} model)")
        check_head(hf_model, OWNER)
        if OWNER in patched_by(hf_model):
            raise ValueError(f"{OWNER}: this trainer's {name} model is already patched")
        plans.append((hf_model, trl_head_outputs(hf_model)))
    policy = trainer.accelerator.unwrap_model(trainer.model)
    # DPOTrainer wraps the model with PEFT itself (peft_config=...), after the user could have patched it.
    patch_lora = lora and not any(hf.OWNER in patched_by(module) for module in policy.modules())
    if patch_lora:
        hf.patch(policy, lora=True, loss=False)  # checks before it changes anything, like this function
    for hf_model, outputs in plans:
        replace_forward(hf_model, fused_logprob_forward(type(hf_model), outputs), OWNER)
    trainer.__dict__[PATCHED_LORA] = patch_lora
    return trainer


def unpatch_dpo_trainer(trainer: trl.DPOTrainer) -> trl.DPOTrainer:
    """Give the trainer's models TRL's own fused head back, and undo the LoRA patch if patch_dpo_trainer made it."""
    patched = [(name, model) for name, model in head_models(trainer) if OWNER in patched_by(model)]
    if not patched:
        raise ValueError(f"{OWNER}: this trainer is not patched")
    for name, model in patched:
        check_restorable(model, f"the {name} model", OWNER)
    for _, model in patched:
        restore_forward(model)
    if trainer.__dict__.pop(PATCHED_LORA, False):
        hf.unpatch(trainer.accelerator.unwrap_model(trainer.model))
    return trainer


class FusedDPOTrainer(trl.DPOTrainer):
    """trl.DPOTrainer with mrgfast's fused log-probs and LoRA from construction on (precomputed reference log-probs
    included)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if PATCHED_LORA not in self.__dict__:
            patch_dpo_trainer(self)

    def _precompute_ref_logps(self, *args, **kwargs):
        # Runs inside DPOTrainer.__init__, after the fused head is added and before __init__ returns.
        if PATCHED_LORA not in self.__dict__:
            patch_dpo_trainer(self)
        return super()._precompute_ref_logps(*args, **kwargs)
