"""The console progress bar (tqdm): step count, loss, tokens/s and ETA."""

from typing import Optional

from tqdm.auto import tqdm


class ProgressBar:
    """A tqdm bar over optimizer steps showing loss and tokens/s; a no-op when disabled (non-main ranks)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled else None

    def update(self, steps: int = 1, loss: Optional[float] = None, tokens_per_s: Optional[float] = None) -> None:
        """Advance by `steps` and refresh the shown loss and tokens/s (tqdm computes the ETA)."""
        if self.bar is None:
            return
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{loss:.4f}"
        if tokens_per_s is not None:
            postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(steps)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
