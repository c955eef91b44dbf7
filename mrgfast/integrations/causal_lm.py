"""A known class's causal-LM forward whose loss comes from mrgfast's fused linear cross-entropy, without logits."""

import functools
import inspect

import torch
from torch import Tensor, nn
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.utils.generic import can_return_tuple

from mrgfast.integrations.models import HEAD_ARGUMENTS, Known
from mrgfast.ops import linear_cross_entropy


def check_head(model: nn.Module, what: str) -> nn.Linear:
    """The model's lm_head when the fused loss can read its weight directly: a plain nn.Linear without hooks."""
    head = model.lm_head
    if type(head) is not nn.Linear:
        raise TypeError(f"{what}: lm_head is a {type(head).__module__}.{type(head).__qualname__} (LoRA on lm_head or "
                        "lm_head in modules_to_save?); the fused loss reads a plain nn.Linear's weight: "
                        "pass loss=False")
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        raise TypeError(f"{what}: lm_head has forward hooks (accelerate offloading?) that the fused loss would bypass; "
                        "pass loss=False")
    if type(head.weight).__name__ == "DTensor" or hasattr(head.weight, "ds_id"):
        # TRL's own head gathers a sharded weight first; mrgfast's ops take the whole [vocab, hidden] matrix.
        raise TypeError(f"{what}: lm_head's weight is sharded (FSDP2 / DeepSpeed ZeRO-3), which the fused ops do not "
                        "gather")
    return head


def check_loss_function(model: nn.Module, what: str) -> None:
    """ValueError unless the model's loss is transformers' ForCausalLMLoss, the one the fused loss reproduces."""
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(f"{what}: the model's loss_function is {model.loss_function!r}, not transformers' "
                         "ForCausalLMLoss that the fused loss reproduces: pass loss=False")


def head_operands(hidden: Tensor, head: nn.Linear) -> tuple:
    """(hidden, weight, bias) in the dtype the head's matmul runs in: autocast's when it is on, as nn.Linear's.

    Call the fused op with autocast off: its kernels choose their own precision (fp32 accumulation), and an
    autocast GEMM inside its CPU kernel would round the chunk's logits to bf16.
    """
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, head.weight, head.bias
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)


def keep_positions(hidden: Tensor, logits_to_keep) -> Tensor:
    """The rows of `hidden` [batch, seq, dim] that the head would see under transformers' `logits_to_keep`.

    transformers' own rule (`slice_logits_to_keep`, which only its newer 5.x releases export): an int keeps the last
    n positions (0 keeps all), a 1-D tensor indexes positions, a 2-D integer tensor gathers positions per sample and a
    2-D bool mask keeps its True rows, flattened. Written out here so the patch runs on every transformers 5.x.
    """
    if torch.is_tensor(logits_to_keep) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


def causal_lm_loss(hidden: Tensor, head: nn.Linear, labels: Tensor, num_items_in_batch=None, ignore_index: int = -100,
                   shift_labels: Tensor = None, **_) -> Tensor:
    """transformers' ForCausalLMLoss from the last hidden states: the same shift, ignore_index and normalisation."""
    if shift_labels is None:
        # As ForCausalLMLoss: position i predicts label i+1, the last position predicts nothing.
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    hidden, weight, bias = head_operands(hidden, head)
    with torch.autocast(hidden.device.type, enabled=False):
        total = linear_cross_entropy(hidden, weight, shift_labels, bias, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        # F.cross_entropy's mean over the counted tokens; NaN when none is counted, as there.
        return total / (shift_labels != ignore_index).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def fused_loss_forward(model: nn.Module, known: Known, return_logits: bool):
    """The forward to bind to `model`: its class's own without labels; with labels, the backbone, then the loss."""
    signature = inspect.signature(type(model).forward)
    var_keyword = next(name for name, p in signature.parameters.items() if p.kind == p.VAR_KEYWORD)
    output_type = known.output_type(type(model))

    @can_return_tuple
    @functools.wraps(type(model).forward)  # the class's signature: Trainer and generate() inspect it
    def forward(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        if arguments.get("labels") is None:
            return type(self).forward(self, *args, **kwargs)
        what = f"mrgfast.patch({type(self).__name__})"
        head = check_head(self, what)  # checked per call: PEFT may wrap lm_head after patching
        check_loss_function(self, what)
        backbone_args = {name: value for name, value in arguments.items()
                         if name not in ("self", var_keyword, *HEAD_ARGUMENTS)}
        loss_kwargs = arguments.get(var_keyword, {})
        # What the class's forward does up to lm_head: the same backbone call with the same arguments.
        outputs = self.model(**backbone_args, **loss_kwargs)
        hidden = keep_positions(outputs.last_hidden_state, arguments.get("logits_to_keep", 0))
        loss = causal_lm_loss(hidden, head, arguments["labels"], **loss_kwargs)
        others = {name: value for name, value in outputs.items() if name != "last_hidden_state"}
        return output_type(loss=loss, logits=head(hidden) if return_logits else None, **others)

    return forward
