"""Random-number state of a process (python, numpy, torch CPU and CUDA): seed, capture and restore exactly."""

import random
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's (CPU and every CUDA device) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng_state() -> dict[str, Any]:
    """This process's generator states: plain values plus uint8 tensors (torch CPU, one per CUDA device)."""
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt_state), "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any], source: str = "rng state") -> None:
    """Put back generator states from capture_rng_state(); ValueError naming `source` when they do not fit."""
    missing = [k for k in ("python", "numpy", "torch_cpu", "torch_cuda") if k not in state]
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    cpu = state["torch_cpu"]
    if not isinstance(cpu, Tensor) or cpu.dtype != torch.uint8:
        raise ValueError(f"{source}: torch_cpu must be a uint8 tensor")
    torch.set_rng_state(cpu)
    cuda = list(state["torch_cuda"])
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have != len(cuda):
            # Different devices would draw different streams: resuming would not be exact.
            raise ValueError(f"{source}: saved with {len(cuda)} CUDA device(s), this process sees {have}")
        torch.cuda.set_rng_state_all(cuda)


def restore_rank_rng_state(states: list, rank: int, source: Union[str, Path]) -> None:
    """Restore `rank`'s entry of `states` (one capture_rng_state() per rank, read from `source`)."""
    if not 0 <= rank < len(states):
        raise ValueError(f"{source}: holds RNG states for {len(states)} rank(s), cannot restore rank {rank}; "
                         "resume with the same number of processes")
    restore_rng_state(states[rank], f"{source} (rank {rank})")
