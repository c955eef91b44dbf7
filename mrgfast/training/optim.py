"""AdamW for the training step: fused, with the LR held in a tensor so the whole step can be graph-captured; a step
that is skipped on the device when the gradients are not finite; the run's hyperparameters kept over a resume."""

from typing import Iterable, Union

import torch
from torch import Tensor, nn


def build_adamw(params: Union[Iterable[nn.Parameter], Iterable[dict]], lr: float, device: torch.device,
                betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                fused: Union[str, bool] = "auto", tensor_lr: bool = True) -> torch.optim.AdamW:
    """AdamW over `params` on `device`.

    fused 'auto'/True: torch's fused kernel (CUDA and CPU), one op per step; on CUDA also `capturable`,
    so its step counters live on the device and the step can be recorded in a CUDA graph. With
    `tensor_lr` the LR is a float32 tensor on `device` that WarmupSchedule updates in place (a float LR
    would be baked into a captured graph). fused False: the reference per-parameter loop, float LR.
    """
    if not (isinstance(fused, bool) or fused == "auto"):
        raise ValueError(f"fused must be 'auto', True or False, got {fused!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = torch.device(device)
    use_fused = fused is not False
    if not use_fused:
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                 foreach=False)
    lr_value: Union[float, Tensor] = torch.tensor(lr, dtype=torch.float32, device=device) if tensor_lr else lr
    optimizer = torch.optim.AdamW(params, lr=lr_value, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                  fused=True, capturable=device.type == "cuda")
    if tensor_lr:
        # Groups left at the default share one LR tensor; each needs its own for the schedule to set it alone.
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
    return optimizer


def is_fused(optimizer: torch.optim.Optimizer) -> bool:
    """Whether every param group runs torch's fused kernel (which can skip its own update on a device flag)."""
    return all(group.get("fused") for group in optimizer.param_groups)


def step_unless(optimizer: torch.optim.Optimizer, found_inf: Tensor) -> None:
    """optimizer.step(), or nothing at all (weights, moments, step counts) where the 0-d float `found_inf` is 1,
    decided on the device without a host read.

    Fused AdamW takes the flag itself, as under AMP's GradScaler: its kernel returns early and the step counts are
    put back. Any other optimizer steps, then has every tensor it changed put back by torch.where from a copy
    (state it created on this first step is zeroed, which is what it would start from).
    """
    if is_fused(optimizer):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    before = {id(t): t.detach().clone() for p in params for t in [p, *tensors_in(optimizer.state.get(p, {}))]}
    optimizer.step()
    with torch.no_grad():
        for p in params:
            for t in [p, *tensors_in(optimizer.state.get(p, {}))]:
                old = before.get(id(t), torch.zeros_like(t))
                t.copy_(torch.where(found_inf.to(t.device).bool(), old, t))


def tensors_in(state: dict) -> list:
    """The tensors among an optimizer's per-parameter state values."""
    return [value for value in state.values() if isinstance(value, Tensor)]


def hyperparameters(optimizer: torch.optim.Optimizer) -> list:
    """Each param group's settings except its parameters and LR (betas, eps, weight_decay, fused, ...)."""
    return [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]


def keep_hyperparameters(optimizer: torch.optim.Optimizer, settings: list) -> None:
    """Put back settings taken by hyperparameters() (e.g. after load_state_dict brought a checkpoint's): a resumed
    run trains with its own config's, which were compared with the checkpoint's before."""
    for group, kept in zip(optimizer.param_groups, settings):
        group.update(kept)
