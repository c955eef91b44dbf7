"""Learning-rate schedules (linear warmup + cosine, constant) that write the LR in place, tensor or float."""

import math
from typing import Optional

import torch
from torch import Tensor

SCHEDULES = ("cosine", "constant")


def cosine_with_warmup(step: int, warmup_steps: int, total_steps: int, num_cycles: float = 0.5,
                       min_lr_rate: float = 0.0) -> float:
    """The LR multiplier at `step`: linear warmup from 0, then cosine decay (transformers' formula exactly)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))
    factor = factor * (1 - min_lr_rate) + min_lr_rate
    return max(0.0, factor)


def constant_with_warmup(step: int, warmup_steps: int) -> float:
    """The LR multiplier at `step`: linear warmup from 0, then 1."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    return 1.0


class WarmupSchedule:
    """Sets each param group's LR to base_lr * multiplier(step), like torch's LambdaLR with HF's lambdas.

    A group whose `lr` is a tensor (a capturable / fused AdamW built for CUDA graphs) is updated in place
    with `fill_`, which queues a device write without waiting for the device, so the graph that captured
    that tensor reads the new LR on its next replay. Call `step()` outside the captured region, after
    `optimizer.step()`, as with torch schedulers.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 name: str = "cosine", num_cycles: float = 0.5, min_lr_rate: float = 0.0):
        if name not in SCHEDULES:
            raise ValueError(f"schedule name must be one of {', '.join(SCHEDULES)}, got {name!r}")
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
                             f"got total_steps={total_steps}, warmup_steps={warmup_steps}")
        if not 0.0 <= min_lr_rate <= 1.0:
            raise ValueError(f"min_lr_rate must be in [0, 1], got {min_lr_rate}")
        self.optimizer = optimizer
        self.name, self.total_steps, self.warmup_steps = name, total_steps, warmup_steps
        self.num_cycles, self.min_lr_rate = num_cycles, min_lr_rate
        # Read once at construction (a host read of a tensor LR is fine here, outside any step).
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        self.apply()

    def multiplier(self, step: Optional[int] = None) -> float:
        """The LR multiplier at `step` (default: the current one)."""
        step = self.last_step if step is None else step
        if self.name == "constant":
            return constant_with_warmup(step, self.warmup_steps)
        return cosine_with_warmup(step, self.warmup_steps, self.total_steps, self.num_cycles, self.min_lr_rate)

    def apply(self) -> None:
        """Write the current LR into every param group (in place for tensor LRs)."""
        factor = self.multiplier()
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            set_group_lr(group, base * factor)

    def step(self) -> None:
        """Advance one optimizer step and write the new LR."""
        self.last_step += 1
        self.apply()

    def get_last_lr(self) -> list[float]:
        """The LR of each param group at the current step, as floats (computed on the host, no device read)."""
        factor = self.multiplier()
        return [base * factor for base in self.base_lrs]

    def state_dict(self) -> dict:
        """The schedule's position and settings."""
        return {"name": self.name, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "num_cycles": self.num_cycles, "min_lr_rate": self.min_lr_rate, "base_lrs": list(self.base_lrs),
                "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        """Restore position and settings from state_dict() and write the LR for that step."""
        self.check_state(state)
        for key in ("name", "total_steps", "warmup_steps", "num_cycles", "min_lr_rate", "last_step"):
            setattr(self, key, state[key])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        self.apply()

    def continue_from(self, state: dict) -> None:
        """Take only the position of a state_dict() and keep this schedule's own settings, then write the LR: a
        resumed run follows the schedule its config describes from the saved step on. With the same settings this is
        load_state_dict; with a longer total_steps the LR goes on along the longer schedule (as if it had been set
        from the start) instead of past the old end, where a cosine would climb again."""
        self.check_state(state)
        self.last_step = state["last_step"]
        self.apply()

    def check_state(self, state: dict) -> None:
        """ValueError unless `state` is a state_dict() of a schedule over this optimizer's param groups."""
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise ValueError(f"schedule state is missing {', '.join(missing)}")
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"schedule state has {len(state['base_lrs'])} base LRs, the optimizer has "
                             f"{len(self.optimizer.param_groups)} param groups")


def set_group_lr(group: dict, value: float) -> None:
    """Set a param group's LR: in place into a tensor LR (keeping the captured memory), else replace."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        with torch.no_grad():
            lr.fill_(value)
    else:
        group["lr"] = value
