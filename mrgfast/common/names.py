"""Short listings of names (weight keys, module paths, sample ids) for error messages."""

from typing import Any, Callable, Sequence

SHOWN = 8


def few(names: Sequence[Any], limit: int = SHOWN, show: Callable[[Any], str] = str) -> str:
    """The first `limit` names, each as `show` writes it, then ", ... (K in all)" when there are more."""
    shown = ", ".join(show(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def key_mismatch(missing: Sequence[str], unexpected: Sequence[str], wrong_shape: Sequence[str] = ()) -> str:
    """"missing N weight(s): ...; M unexpected weight(s): ...; ..." for a checkpoint against a model ("" if none)."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} weight(s): {few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s): {few(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} weight(s) of the wrong shape: {few(wrong_shape)}")
    return "; ".join(problems)
