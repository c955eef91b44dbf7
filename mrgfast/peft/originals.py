"""Frozen copies of the non-adapter weights LoRA trains (modules_to_save, biases): the base stays computable."""

from torch import nn

# Non-persistent buffers: they follow .to()/.half() with their module but stay out of every state_dict.
ORIGINAL_PREFIX = "mrgfast_original_"


def keep_original(module: nn.Module, name: str) -> None:
    """Store a frozen copy of `module`'s parameter `name` beside it, for disable_adapters."""
    param = module._parameters[name]
    module.register_buffer(f"{ORIGINAL_PREFIX}{name}", param.detach().clone(), persistent=False)


def drop_originals(model: nn.Module) -> None:
    """Remove every frozen copy keep_original stored in `model`."""
    for module in model.modules():
        for name in [b for b in module._buffers if b.startswith(ORIGINAL_PREFIX)]:
            del module._buffers[name]


def swap_in_originals(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Point every use of a trained parameter that has a frozen copy (tied uses included) at that copy.

    Returns what was replaced, for restore_swapped. The Parameter objects are swapped, not their data, so
    autograd graphs built outside the block keep seeing the trained tensors.
    """
    originals = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            original = module._buffers.get(f"{ORIGINAL_PREFIX}{name}")
            if param is not None and original is not None:
                originals[id(param)] = nn.Parameter(original, requires_grad=False)
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in originals:
                swapped.append((module, name, param))
                module._parameters[name] = originals[id(param)]
    return swapped


def restore_swapped(swapped: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Put back the parameters swap_in_originals replaced."""
    for module, name, param in reversed(swapped):
        module._parameters[name] = param
