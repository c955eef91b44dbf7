"""Replace one module instance's forward and put back exactly what was there (the class's or an earlier patch's)."""

import types
from typing import Callable

from torch import nn

# Instance attribute: the stack of [(owner, replaced instance forward or None for the class's)] our patches pushed.
# An attribute, not a registry beside the model, so it follows the module through copy.deepcopy. A stack, because
# TRL's LM head can sit between mrgfast.patch's forward and the TRL integration's.
SAVED = "_mrgfast_saved_forwards"
TAG = "__mrgfast_owner__"  # on each patched forward function: which patch bound it (what check_restorable reads)


def replace_forward(module: nn.Module, function: Callable, owner: str) -> None:
    """Bind `function` as `module.forward`, this instance only, remembering what it replaces."""
    setattr(function, TAG, owner)
    module.__dict__.setdefault(SAVED, []).append((owner, module.__dict__.get("forward")))
    module.forward = types.MethodType(function, module)


def patched_by(module: nn.Module) -> list:
    """The owners of the patches on this instance, oldest first ([] when none)."""
    return [owner for owner, _ in module.__dict__.get(SAVED, [])]


def previous_forward(module: nn.Module, owner: str) -> Callable:
    """The forward `owner`'s patch replaced on this instance (bound), or the class's own."""
    previous = next(previous for who, previous in module.__dict__[SAVED] if who == owner)
    return previous if previous is not None else types.MethodType(type(module).forward, module)


def check_restorable(module: nn.Module, name: str, owner: str) -> None:
    """ValueError unless `owner`'s forward is the one in place: if someone replaced it since, restoring what ours
    replaced would drop theirs (e.g. TRL's fused LM head over mrgfast.patch's forward)."""
    current = module.__dict__.get("forward")
    if getattr(getattr(current, "__func__", None), TAG, None) != owner or patched_by(module)[-1] != owner:
        replaced_by = getattr(getattr(current, "__func__", current), "__qualname__", repr(current))
        raise ValueError(f"{name}: its forward was replaced after {owner} patched it (now {replaced_by}); undo "
                         "that first, or rebuild the model")


def restore_forward(module: nn.Module) -> None:
    """Put back the forward the newest patch on this instance replaced."""
    saved = module.__dict__[SAVED]
    _, previous = saved.pop()
    if not saved:
        del module.__dict__[SAVED]
    if previous is None:
        del module.__dict__["forward"]
    else:
        module.__dict__["forward"] = previous
