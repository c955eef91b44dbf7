"""modules_to_save: which modules a config trains in full (PEFT's matching rule)."""

from torch import nn

from mrgfast.peft.matching import matches_modules_to_save


def find_modules_to_save(model: nn.Module, names) -> list[str]:
    """Paths of the outermost modules matched by `names` (PEFT's suffix rule); ValueError for a name matching none."""
    if not names:
        return []
    paths = [key for key, _ in model.named_modules() if key and matches_modules_to_save(names, key)]
    unmatched = [n for n in names if not any(p.endswith(n) for p in paths)]
    if unmatched:
        raise ValueError(f"modules_to_save entries {unmatched} match no module of the {type(model).__name__} "
                         "(a module path must end with the name, e.g. 'lm_head')")
    # A matched module inside another matched module is saved as part of the outer one.
    return [p for p in paths if not any(p.startswith(f"{q}.") for q in paths)]
