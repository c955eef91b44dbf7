"""Tokens/s, achieved TFLOP/s and MFU: FLOPs per token from parameter counts, peak FLOP/s per device."""

import re
import time
from typing import Optional

import torch

# Dense (no sparsity) tensor-core peak TFLOP/s from the vendors' datasheets: (bf16, fp16); None where the chip
# has no bf16. First match wins, so specific names come before their families. A10G: AWS's figure.
PEAK_TFLOPS = (
    (r"B200", 2250.0, 2250.0),
    (r"H200 NVL", 835.0, 835.0),
    (r"H200", 989.4, 989.4),
    (r"H100 NVL", 835.0, 835.0),
    (r"H100.*PCIe", 756.0, 756.0),
    (r"H100|H800", 989.4, 989.4),
    (r"A100", 312.0, 312.0),
    (r"A10G", 70.0, 70.0),
    (r"A10\b", 125.0, 125.0),
    (r"L40S", 362.05, 362.05),
    (r"L40\b", 181.05, 181.05),
    (r"L4\b", 121.0, 121.0),
    (r"RTX 4090", 165.2, 165.2),
    (r"V100.*PCIE", None, 112.0),
    (r"V100", None, 125.0),
    (r"T4\b", None, 65.0),
)


def training_flops_per_token(total_params: int, trainable_params: int, full_finetune: bool = False) -> float:
    """The weight-matmul FLOPs a training step must do per token, from parameter counts (attention is separate:
    attention_flops).

    Forward 2N, gradients of the activations 2N (needed through frozen weights too), gradients of the
    weights 2 per trainable parameter: 6N for full fine-tuning, 4N + 2*trainable for PEFT.
    """
    if total_params < 0 or not 0 <= trainable_params <= total_params:
        raise ValueError(f"need 0 <= trainable_params <= total_params, got {trainable_params} and {total_params}")
    if full_finetune:
        return 6.0 * total_params
    return 4.0 * total_params + 2.0 * trainable_params


def attention_flops(documents, layers: int, attention_dim: int) -> float:
    """The FLOPs causal attention must do, forward and backward, over packed documents [(queries, keys), ...].

    Each document's queries are its last keys (bottom-right causal): q * (k - q) + q * (q + 1) / 2 query-key pairs,
    each 2 * attention_dim FLOPs for the scores and as many for the weighted values (4d), times 3 for the forward
    and a backward of twice its cost; attention_dim is heads * head_dim, summed over `layers`.
    """
    pairs = sum(q * (k - q) + q * (q + 1) / 2 for q, k in documents)
    return 3.0 * 4.0 * attention_dim * pairs * layers


def peak_tflops_for(name: str, dtype: torch.dtype = torch.bfloat16) -> Optional[float]:
    """Datasheet dense peak TFLOP/s of a GPU named like torch.cuda.get_device_name(), or None if unknown."""
    for pattern, bf16, fp16 in PEAK_TFLOPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            if dtype == torch.bfloat16 and bf16 is not None:
                return bf16
            return fp16
    return None


def measure_cpu_tflops(size: int = 512, repeats: int = 5) -> float:
    """The best fp32 matmul throughput of this CPU (TFLOP/s) over a few size^3 products: the CPU's 'peak'."""
    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))
    b = torch.randn(size, size, generator=torch.Generator().manual_seed(1))
    torch.mm(a, b)  # warm up the BLAS threads
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best / 1e12


def device_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from) for a device: the GPU table, or a matmul measured on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = peak_tflops_for(name, dtype)
        return peak, f"datasheet {name}" if peak is not None else f"unknown GPU {name!r}"
    return measure_cpu_tflops(), "measured fp32 matmul"


class Throughput:
    """Tokens/s, TFLOP/s and MFU over the interval since the previous report (wall time, host clock)."""

    def __init__(self, flops_per_token: float, peak_tflops: Optional[float]):
        if flops_per_token < 0:
            raise ValueError(f"flops_per_token must be >= 0, got {flops_per_token}")
        self.flops_per_token = flops_per_token
        self.peak_tflops = peak_tflops
        self.tokens = 0
        self.extra_flops = 0.0
        self.start = time.perf_counter()

    def add(self, tokens: int, extra_flops: float = 0.0) -> None:
        """Count tokens processed by this process, and FLOPs they cost beyond flops_per_token (attention)."""
        self.tokens += tokens
        self.extra_flops += extra_flops

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of the current interval out of the rate (time spent on something else, e.g. evaluation)."""
        self.start += seconds

    def report(self) -> dict[str, float]:
        """tokens_per_s, tflops and (with a known peak) mfu since the last report; resets the interval."""
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        tflops = (self.tokens * self.flops_per_token + self.extra_flops) / elapsed / 1e12
        out = {"tokens_per_s": tokens_per_s, "tflops": tflops}
        if self.peak_tflops:
            out["mfu"] = tflops / self.peak_tflops
        self.tokens, self.extra_flops, self.start = 0, 0.0, now
        return out
