"""Run guards: NaN/inf losses and gradients (the step skips such updates; stop or go on), divergence, non-finite
weights before a save, and SIGTERM turned into a clean-stop flag. The errors carry their exit codes."""

import math
import signal
import sys
import threading
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from mrgfast.common.exit_codes import NONFINITE, for_signal
from mrgfast.common.names import few


class NonFiniteError(FloatingPointError):
    """Training went wrong numerically (non-finite values, divergence): the run stops without saving."""

    exit_code = NONFINITE


class NonFiniteLossError(NonFiniteError):
    """The loss or the gradient norm became NaN or infinite; the message names the step and the batch's sample ids."""

    def __init__(self, step: int, batch_ids: Sequence[Any], value: float, grad_norm: Optional[float] = None):
        self.step, self.batch_ids, self.value, self.grad_norm = step, list(batch_ids), value, grad_norm
        what = (f"non-finite loss ({value})" if not math.isfinite(value)
                else f"non-finite gradient norm ({grad_norm}; loss {value})")
        super().__init__(f"{what} at step {step}, batch sample ids [{few(self.batch_ids, 20)}]; the step's update "
                         "was skipped and the run stops without saving, the last good checkpoint left untouched "
                         "(guard.on_nonfinite=skip goes on past such steps)")


class DivergenceError(NonFiniteError):
    """Training diverged (zero gradients for many steps, or huge weights) under guard.on_nonfinite=stop."""


def check_finite_loss(loss: float, step: int, batch_ids: Sequence[Any]) -> None:
    """Raise NonFiniteLossError when a host-side loss value is NaN or infinite."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(step, batch_ids, loss)


class NonFiniteGuard:
    """Watches each step's loss and gradient norm on the device without synchronising; check() reads what it saw
    since the last check once, where the loop reads values anyway (logging) and always before a checkpoint.

    A step whose loss or gradient norm is non-finite has already been skipped by the step itself
    (training.steps.train_step). Without `skip` check() raises NonFiniteLossError for the first such step; with it,
    check() raises only when more than `max_consecutive_skips` of them came in a row, and reports the others.
    Divergence (a gradient norm of exactly 0 for `zero_grad_steps` steps in a row, or a weight above
    `max_abs_weight` in check_weights) raises DivergenceError without `skip`, and is warned about once with it.
    """

    def __init__(self, device: torch.device, skip: bool = False, max_consecutive_skips: int = 10,
                 zero_grad_steps: int = 0, max_abs_weight: Optional[float] = None):
        self.device = torch.device(device)
        self.skip, self.max_consecutive_skips = skip, max_consecutive_skips
        self.zero_grad_steps, self.max_abs_weight = zero_grad_steps, max_abs_weight

        def zero(dtype=torch.long):
            return torch.zeros((), dtype=dtype, device=self.device)

        # Since the last check: index of the first bad observation (-1: none), its loss and gradient norm, how many
        # observations and bad ones, and the longest runs of bad and of zero-norm steps.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        self.first_value, self.first_norm = zero(torch.float32), zero(torch.float32)
        self.count, self.bad_steps, self.worst_bad_run, self.worst_zero_run = zero(), zero(), zero(), zero()
        # The current runs, which go on across checks.
        self.bad_run, self.zero_run = zero(), zero()
        self.history: list[tuple[int, list]] = []
        self.skipped = 0          # steps skipped so far (read at checks), for the log
        self.warned = False       # divergence is warned about once under skip

    def observe(self, loss: Tensor, step: int, batch_ids: Sequence[Any], grad_norm: Optional[Tensor] = None) -> None:
        """Record one step's loss and gradient norm (0-d tensors on the guard's device) and its batch ids."""
        with torch.no_grad():
            value = loss.detach().float()
            norm = grad_norm.detach().float() if grad_norm is not None else torch.ones_like(value)
            bad = ~torch.isfinite(value) | ~torch.isfinite(norm)
            first = bad & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(first, self.count, self.first_bad))
            self.first_value.copy_(torch.where(first, value, self.first_value))
            self.first_norm.copy_(torch.where(first, norm, self.first_norm))
            self.bad_steps.add_(bad.long())
            self.bad_run.copy_(torch.where(bad, self.bad_run + 1, 0))
            self.worst_bad_run.copy_(torch.maximum(self.worst_bad_run, self.bad_run))
            self.zero_run.copy_(torch.where(norm == 0, self.zero_run + 1, 0))
            self.worst_zero_run.copy_(torch.maximum(self.worst_zero_run, self.zero_run))
            self.count.add_(1)
        self.history.append((step, list(batch_ids)))

    def check(self) -> int:
        """Read what was observed since the last check (one host read) and act on it (see the class); returns the
        number of steps skipped so far."""
        first, bad, worst_bad, worst_zero, value, norm = torch.stack([
            t.double() for t in (self.first_bad, self.bad_steps, self.worst_bad_run, self.worst_zero_run,
                                 self.first_value, self.first_norm)]).tolist()
        history = list(self.history)
        self.history.clear()
        for counter in (self.count, self.bad_steps, self.worst_bad_run, self.worst_zero_run):
            counter.zero_()
        self.first_bad.fill_(-1)
        if first >= 0:
            step, ids = history[int(first)]
            if not self.skip:
                raise NonFiniteLossError(step, ids, value, norm)
            if worst_bad > self.max_consecutive_skips:
                raise NonFiniteError(f"{int(worst_bad)} steps in a row had a non-finite loss or gradient norm, more "
                                     f"than guard.max_consecutive_skips={self.max_consecutive_skips} (up to step "
                                     f"{history[-1][0]}); the run stops without saving")
            self.skipped += int(bad)
            print(f"mrgfast.train: skipped {int(bad)} step(s) with a non-finite loss or gradient norm, the first at "
                  f"step {step} (loss {value}, gradient norm {norm}, batch sample ids [{few(ids, 20)}]); "
                  f"{self.skipped} skipped so far", file=sys.stderr)
        if self.zero_grad_steps and worst_zero >= self.zero_grad_steps:
            self.diverged(f"the gradient norm was exactly 0 for {int(worst_zero)} steps in a row (up to step "
                          f"{history[-1][0]}; guard.zero_grad_steps={self.zero_grad_steps})")
        return self.skipped

    def check_weights(self, largest: float, step: int) -> None:
        """Act on the largest magnitude among the trainable weights after `step` (max_abs): non-finite always stops
        (NonFiniteError), above max_abs_weight is divergence."""
        if not math.isfinite(largest):
            raise NonFiniteError(f"the trainable weights are non-finite after step {step} (an update overflowed: is "
                                 "optim.lr too large?); the run stops without saving")
        if self.max_abs_weight is not None and largest > self.max_abs_weight:
            self.diverged(f"a trainable weight reached {largest:.3g} after step {step}, above "
                          f"guard.max_abs_weight={self.max_abs_weight:g}")

    def diverged(self, reason: str) -> None:
        """Divergence: DivergenceError without skip, a warning (once) with it."""
        if not self.skip:
            raise DivergenceError(f"training diverged: {reason}; the run stops without saving "
                                  "(guard.on_nonfinite=skip only warns)")
        if not self.warned:
            print(f"mrgfast.train: WARNING: training diverged: {reason}; going on (guard.on_nonfinite=skip)",
                  file=sys.stderr)
            self.warned = True


def local(tensor: Tensor) -> Tensor:
    """This rank's part of a tensor (an FSDP2 DTensor's local shard), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def max_abs(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """The largest magnitude among the (local parts of the) tensors as a 0-d float tensor on `device`, inf if any
    holds a NaN (so a maximum over ranks keeps it): device ops only, no host read."""
    parts = [local(t).detach() for t in tensors if local(t).numel()]
    if not parts:
        return torch.zeros((), device=device)
    norms = torch._foreach_norm(parts, float("inf"))
    return torch.nan_to_num(torch.stack([n.float() for n in norms]).max(), nan=float("inf")).to(device)


def nonfinite_names(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors (local parts) holding a NaN or inf: one host read for all."""
    names, flags = [], []
    for name, tensor in named:
        part = local(tensor).detach()
        if part.is_floating_point() and part.numel():
            names.append(name)
            flags.append(torch.isfinite(part).all())
    if not flags:
        return []
    return [name for name, ok in zip(names, torch.stack(flags).tolist()) if not ok]


def trainable_state(named_params: Iterable[tuple[str, Tensor]], optimizer: torch.optim.Optimizer):
    """(name, tensor) of the trainable weights and of their optimizer state (e.g. 'x.weight:exp_avg')."""
    for name, param in named_params:
        yield name, param
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor):
                yield f"{name}:{key}", value


class StoppedBySignal(Exception):
    """The run stopped early on a signal after saving its checkpoint: not finished, so the program exits 128 + the
    signal's number (143 for SIGTERM)."""

    def __init__(self, signal_name: str, step: int, checkpoint):
        self.exit_code = for_signal(signal.Signals[signal_name])
        super().__init__(f"stopped by {signal_name} at step {step} after saving {checkpoint}; the run is not "
                         "finished (resume=auto continues it)")


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
