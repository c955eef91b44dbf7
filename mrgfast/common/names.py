"""Short listings of names (weight keys, module paths, sample ids) for error messages."""

from typing import Any, Callable, Sequence

SHOWN = 8


def few(names: Sequence[Any], limit: int = SHOWN, show: Callable[[Any], str] = str) -> str:
    """The first `limit` names, each as `show` writes it, then ", ... (K in all)" when there are more."""
    shown = ", ".join(show(name) for name in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")
