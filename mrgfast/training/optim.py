"""AdamW for the training step: fused, with the LR held in a tensor so the whole step can be graph-captured."""

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
