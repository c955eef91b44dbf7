"""PEFT's lora.Linear forward on mrgfast's fused LoRA op, keeping PEFT's parameters and adapter bookkeeping."""

import warnings

from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from mrgfast.common.names import few
from mrgfast.ops import lora_linear

# Per-module record of the reasons already warned about, so each is said once (an attribute: it follows deepcopy).
WARNED = "_mrgfast_warned"


def has_hooks(module: nn.Module) -> bool:
    """Whether calling the module runs more than its forward (hooks the fused op would bypass)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def unsupported(layer: PeftLoraLinear, adapter: str) -> str:
    """Why this adapter of a lora.Linear cannot run on the fused op, or '' when it can."""
    if adapter in layer.lora_variant:
        return type(layer.lora_variant[adapter]).__name__.replace("LinearVariant", "")  # Dora, ALora, Arrow...
    if layer.lora_bias.get(adapter, False):
        return "lora_bias"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out"
    if type(layer.base_layer) is not nn.Linear:
        return f"a {type(layer.base_layer).__name__} base layer"
    if has_hooks(layer.base_layer):
        return "hooks on the base layer"
    if type(layer.lora_dropout[adapter]) not in (nn.Dropout, nn.Identity):
        return f"{type(layer.lora_dropout[adapter]).__name__} dropout"
    return ""


def layer_reasons(layer: nn.Module) -> list:
    """What keeps a LoRA layer (any adapter of it) on PEFT's path: [] when all of it can run fused."""
    if type(layer) is not PeftLoraLinear:
        return [f"a PEFT {type(layer).__name__}, not lora.Linear"]
    reasons = [unsupported(layer, adapter) for adapter in layer.lora_A]
    return sorted({reason for reason in reasons if reason})


def lora_layers(model: nn.Module) -> tuple:
    """([(name, lora.Linear)] to patch, {name: reasons} for every LoRA layer with something left to PEFT)."""
    layers, left = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if type(module) is PeftLoraLinear:
            layers.append((name, module))
        reasons = layer_reasons(module)
        if reasons:
            left[name] = reasons
    return layers, left


def warn_left_on_peft(left: dict) -> None:
    """One warning naming the modules (and why) that stay on PEFT's path."""
    listed = few([f"{name} ({', '.join(reasons)})" for name, reasons in left.items()])
    warnings.warn(f"mrgfast.patch: these LoRA modules stay on PEFT's own path (the fused op does not implement "
                  f"what they use): {listed}", stacklevel=3)


def mark_warned(layer: nn.Module, reasons: list) -> None:
    """Remember that these reasons were already warned about for this layer."""
    layer.__dict__.setdefault(WARNED, set()).update(reasons)


def warn_once(layer: nn.Module, name: str, reason: str) -> None:
    """Warn the first time a reason sends this layer to PEFT's path at run time (an adapter added after patch)."""
    warned = layer.__dict__.setdefault(WARNED, set())
    if reason not in warned:
        warned.add(reason)
        warnings.warn(f"mrgfast.patch: {name} runs on PEFT's own path: {reason}", stacklevel=3)


def fused_lora_forward(name: str):
    """The forward to bind to one lora.Linear (`name` is its path, for warnings)."""

    def forward(self, x, *args, **kwargs):
        adapters = [adapter for adapter in self.active_adapters if adapter in self.lora_A]
        if self.disable_adapters or self.merged or not adapters:
            # PEFT's bookkeeping paths (unmerge on disable, merged weights, no adapter here): no LoRA term to fuse.
            return PeftLoraLinear.forward(self, x, *args, **kwargs)
        if args or kwargs:
            reason = f"forward arguments {sorted(kwargs)} (mixed-adapter batches)" if kwargs else "extra arguments"
        elif len(adapters) > 1:
            reason = f"{len(adapters)} adapters active at once"
        else:
            reason = unsupported(self, adapters[0])
        if reason:
            warn_once(self, name, reason)
            return PeftLoraLinear.forward(self, x, *args, **kwargs)
        adapter = adapters[0]
        dropout = self.lora_dropout[adapter]
        return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A[adapter].weight,
                           self.lora_B[adapter].weight, self.scaling[adapter],
                           dropout_p=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                           training=dropout.training)

    return forward
