"""disable_adapters: run a LoRA model as its exact base model inside a `with` block (the DPO reference)."""

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from mrgfast.peft.originals import restore_swapped, swap_in_originals
from mrgfast.peft.state import require_lora_state


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base model: LoRA off, modules_to_save and trained biases at their
    original weights (PEFT leaves trained biases in place; mrgfast reverts them so the block is exactly the base).

    Merged adapters are unmerged on entry and merged again on exit (the base weight is then restored up to
    rounding); everything is put back on exit, also when the block raises. Run the block under torch.no_grad()
    when only the reference outputs are needed.
    """
    state = require_lora_state(model, "disable_adapters")
    layers = [model.get_submodule(path) for path in state.lora_paths]
    before = [(layer, layer.disable_adapters, layer.merged) for layer in layers]
    swapped = []
    state.disabled_depth += 1
    try:
        for layer in layers:
            if layer.merged:
                layer.unmerge()
            layer.enable_adapters(False)
        swapped = swap_in_originals(model)
        yield model
    finally:
        restore_swapped(swapped)
        for layer, was_disabled, was_merged in before:
            layer.enable_adapters(not was_disabled)
            if was_merged and not layer.merged:
                layer.merge()
        state.disabled_depth -= 1

