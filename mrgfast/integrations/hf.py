"""mrgfast.patch / mrgfast.unpatch: mrgfast's kernels into a transformers (+ PEFT) model instance, and back out."""

import importlib.util

from torch import nn

from mrgfast.integrations.causal_lm import check_head, check_loss_function, fused_loss_forward
from mrgfast.integrations.instance import check_restorable, patched_by, replace_forward, restore_forward
from mrgfast.integrations.models import check_known, unwrap_peft
from mrgfast.integrations.norms import norm_layers

OWNER = "mrgfast.patch"

def patch(model: nn.Module, lora: bool = True, loss: bool = True, norms: bool = False,
          return_logits: bool = False) -> nn.Module:
    """Patch a Llama / Qwen2 / Qwen2-VL / Qwen2.5-VL model (or a PeftModel around one) in place; returns it.

    lora: PEFT lora.Linear layers compute with mrgfast.ops.lora_linear (PEFT keeps its parameters and bookkeeping;
    what the op does not implement stays on PEFT's path, with one warning naming the modules).
    loss: with labels, the loss comes from mrgfast.ops.linear_cross_entropy on the last hidden states, with
    transformers' semantics; `logits` is then None unless return_logits=True.
    norms: the RMSNorm and SwiGLU MLP instances compute with mrgfast.ops.rms_norm / swiglu (RoPE stays transformers':
    see mrgfast.integrations.norms).
    Every check runs before anything changes, so a refused model is left untouched.
    """
    hf_model = unwrap_peft(model)
    known = check_known(hf_model, OWNER)
    if any(OWNER in patched_by(module) for module in model.modules()):
        raise ValueError(f"{OWNER}: this model is already patched; call mrgfast.unpatch(model) first")
    if loss:
        check_head(hf_model, OWNER)
        check_loss_function(hf_model, OWNER)
    layers, left = [], {}
    if lora and importlib.util.find_spec("peft") is not None:  # without PEFT installed there are no PEFT layers
        from mrgfast.integrations.peft_lora import fused_lora_forward, lora_layers, mark_warned, warn_left_on_peft
        layers, left = lora_layers(model)
    normed = [(name, module) for name, module, _ in norm_layers(hf_model)] if norms else []
    for name, module in layers + normed + ([(type(hf_model).__name__, hf_model)] if loss else []):
        if "forward" in module.__dict__:
            # Someone (Liger, TRL's fused LM head) already replaced this instance's forward: ours would run
            # beside theirs, not through it.
            raise ValueError(f"{OWNER}: {name}.forward is already replaced on this instance; patch the model "
                             "before anything else patches it")
    for name, layer in layers:
        replace_forward(layer, fused_lora_forward(name), OWNER)
        mark_warned(layer, left.get(name, []))
    if left:
        warn_left_on_peft(left)
    if norms:
        for _, module, forward in norm_layers(hf_model):
            replace_forward(module, forward, OWNER)
    if loss:
        replace_forward(hf_model, fused_loss_forward(hf_model, known, return_logits), OWNER)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo mrgfast.patch on this model in place (bit-identical behaviour to before it); returns it."""
    patched = [(name or type(module).__name__, module) for name, module in model.named_modules()
               if OWNER in patched_by(module)]
    if not patched:
        raise ValueError("mrgfast.unpatch: this model is not patched by mrgfast.patch")
    for name, module in patched:
        check_restorable(module, name, OWNER)  # all checked first: never unpatched half-way
    for _, module in patched:
        restore_forward(module)
    return model
