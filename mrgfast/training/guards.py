"""Run guards: stop on a NaN/inf loss naming the step and batch, and turn SIGTERM into a clean-stop flag."""

import math
import signal
import threading
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from mrgfast.common.names import few


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step and the batch's sample ids."""

    def __init__(self, step: int, batch_ids: Sequence[Any], value: float):
        self.step, self.batch_ids, self.value = step, list(batch_ids), value
        super().__init__(f"non-finite loss ({value}) at step {step}, batch sample ids [{few(self.batch_ids, 20)}]; "
                         "the run stops here and the last good checkpoint is left untouched")


def check_finite_loss(loss: float, step: int, batch_ids: Sequence[Any]) -> None:
    """Raise NonFiniteLossError when a host-side loss value is NaN or infinite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(step, batch_ids, loss)


class NonFiniteGuard:
    """Watches device losses without synchronising each step; check() reads them once and raises for the first
    non-finite one, naming its step and batch.

    observe() only queues device ops (in-place, fixed shapes), so it adds no host sync to the step; call
    check() where the loop reads values anyway (logging) and always before writing a checkpoint.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        # Index (among observations since the last check) of the first non-finite loss, -1 while all are finite.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.first_value = torch.zeros((), dtype=torch.float32, device=self.device)
        self.count = torch.zeros((), dtype=torch.long, device=self.device)
        self.history: list[tuple[int, list]] = []

    def observe(self, loss: Tensor, step: int, batch_ids: Sequence[Any]) -> None:
        """Record one step's loss (a 0-d tensor on the guard's device) and its batch ids."""
        with torch.no_grad():
            bad = ~torch.isfinite(loss.detach().float())
            first = bad & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(first, self.count, self.first_bad))
            self.first_value.copy_(torch.where(first, loss.detach().float(), self.first_value))
            self.count.add_(1)
        self.history.append((step, list(batch_ids)))

    def check(self) -> None:
        """Raise NonFiniteLossError for the first non-finite loss observed since the last check (one host read)."""
        index = int(self.first_bad.item())
        if index >= 0:
            step, ids = self.history[index]
            raise NonFiniteLossError(step, ids, float(self.first_value.item()))
        self.history.clear()
        self.count.zero_()


class GracefulStop:
    """Context manager: SIGTERM (and the other given signals) set `requested` instead of killing the process,
    so the loop can save a checkpoint and exit cleanly; previous handlers come back on exit."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self.received: Optional[int] = None
        self.previous: dict[int, Any] = {}

    def handle(self, signum, frame) -> None:
        """Signal handler: note the request (the loop polls `requested`)."""
        self.requested = True
        self.received = signum

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("GracefulStop must be entered from the main thread (Python delivers signals there)")
        for signum in self.signals:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def reason(self) -> str:
        """The signal's name, for the log line the loop writes when it stops."""
        return signal.Signals(self.received).name if self.received is not None else ""
